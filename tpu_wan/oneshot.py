"""generate_flax.py's engine: all three models loaded once, a warmup that compiles every program, a timed run.

Same encode / denoise / decode calls as the stage runners in tpu_wan.pipeline, so one process and three
processes compute the same numbers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from tpu_wan import artifacts, checkpoints, sweep
from tpu_wan.config import GenerationConfig
from tpu_wan.mesh import make_mesh
from tpu_wan.pipeline import (
    SamplingArgs, _decoder, _denoiser, _encoder, _finetune, denoise, encode, plan, resolve_sampling, video_paths,
)


class Generator:
    """All three models loaded once on one mesh: encode -> denoise -> decode in memory (generate_flax.py)."""

    def __init__(self, model_id: str, mesh, *, text_dtype: str, dtype: str, attention="auto", timer=None,
                 vae_dtype: str = "float32", **finetune):
        from tpu_wan.profiling import Timer

        self.timer = timer or Timer()
        model_path = checkpoints.resolve_model(model_id)
        with self.timer("load text encoder"):
            self.encoder = _encoder(model_path, mesh, text_dtype)
        with self.timer("load transformer"):
            self.denoiser = _denoiser(model_path, mesh, dtype, attention, **finetune)
        with self.timer("load vae"):
            self.decoder = _decoder(model_path, mesh, vae_dtype)

    def run(self, cfg: GenerationConfig, *, progress: bool = True):
        """(prompt_embeds, negative_prompt_embeds, latents [V ...], frames [V ...]) for every video of `cfg`."""
        with self.timer("text encoder"):
            prompt_embeds, negative_embeds = encode(self.encoder, cfg)
        with self.timer("transformer"):
            latents = denoise(self.denoiser, cfg, prompt_embeds, negative_embeds, progress=progress)
        with self.timer("vae"):
            frames = np.concatenate([self.decoder.decode(x[None]) for x in latents])
        return prompt_embeds, negative_embeds, latents, frames

    def warmup(self, cfg: GenerationConfig, num_steps: int):
        """Compiles every program `run(cfg)` uses: all prompts encoded, one batch denoised for `num_steps`
        (batches are padded to one shape), one video decoded."""
        with self.timer("warmup"):
            prompt_embeds, negative_embeds = encode(self.encoder, cfg)
            first = plan(cfg)[:1]
            latents = []
            sweep.denoise_videos(self.denoiser, cfg, prompt_embeds, negative_embeds, first, plan(cfg),
                                 lambda group, x: latents.append(x), num_steps=num_steps, progress=False)
            self.decoder.decode(latents[0])


@dataclasses.dataclass
class GenerateResult:
    config: GenerationConfig
    videos: list[Path]
    timer: object
    seconds_per_step: float


def generate(
    model_id: str,
    prompts: list[str],
    negative_prompt: str,
    sampling: SamplingArgs,
    *,
    output_video: str | Path | None = None,
    output_dir: str | Path | None = None,
    max_sequence_length: int = 512,
    fps: int = 16,
    vae_dtype: str = "float32",
    dp: int | None = None,
    tp: int | None = None,
    attention="auto",
    warmup_steps: int = 2,
    save_intermediates: str | Path | None = None,
) -> GenerateResult:
    """All three stages in one process: load, warm up (compiles everything), then the timed run."""
    from tpu_wan import video

    mesh = make_mesh(dp, tp)
    cfg = resolve_sampling(
        GenerationConfig(
            model_id=model_id, prompts=tuple(prompts), negative_prompt=negative_prompt,
            max_sequence_length=max_sequence_length, fps=fps, vae_dtype=vae_dtype,
        ),
        sampling,
        mesh,
    )
    cfg = cfg.replace(text_dtype=cfg.dtype)
    paths = video_paths(cfg, output_video, output_dir)
    gen = Generator(model_id, mesh, text_dtype=cfg.text_dtype, dtype=cfg.dtype, attention=attention,
                    vae_dtype=vae_dtype, **_finetune(cfg, sampling.non_strict))
    if warmup_steps:
        gen.warmup(cfg, min(warmup_steps, cfg.num_inference_steps))
    prompt_embeds, negative_embeds, latents, frames = gen.run(cfg)
    with gen.timer("write video"):
        paths = [video.write_video(path, f, cfg.fps) for path, f in zip(paths, frames)]
    if save_intermediates:
        folder = Path(save_intermediates)
        videos = plan(cfg)
        artifacts.save_embeddings(folder, prompt_embeds, negative_embeds, metadata={"model_id": model_id})
        for v, x in zip(videos, latents):
            path = sweep.latents_path(folder, v, single=len(videos) == 1)
            artifacts.save_latents(path, x[None], metadata=sweep.video_metadata(cfg, v))
        artifacts.save_frames(folder, frames)
        artifacts.save_config(folder, cfg.to_json_dict())
    per_step = gen.timer.seconds["transformer"] / (cfg.num_inference_steps * len(batches_of(cfg)))
    return GenerateResult(config=cfg, videos=paths, timer=gen.timer, seconds_per_step=per_step)


def batches_of(cfg: GenerationConfig):
    from tpu_wan.batch import batches

    return batches(plan(cfg), cfg.batch_size)
