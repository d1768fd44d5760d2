"""generate_flax.py's engine: all three models loaded once, a warmup that compiles every program, timed runs,
and the metrics of it all (tpu_wan.runtime.profiling).

Same encode / denoise / decode calls as the stage runners in tpu_wan.run.pipeline, so one process and three
processes compute the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np

from tpu_wan.core import artifacts
from tpu_wan.core.config import GenerationConfig, Stage2Settings
from tpu_wan.models import checkpoints
from tpu_wan.run import preflight, sweep
from tpu_wan.run.pipeline import (
    add_stage1_models,
    check_offload,
    denoise,
    encode,
    finetune_settings,
    image_request,
    load_decoder,
    load_denoiser,
    load_encoder,
    load_image_conditioner,
    model_preset,
    plan,
    resolve_stage2,
    video_paths,
    with_images,
)
from tpu_wan.runtime.mesh import check_heads, make_mesh
from tpu_wan.runtime.profiling import Recorder


class Generator:
    """All three models loaded once on one mesh: encode -> denoise -> decode in memory (generate_flax.py)."""

    def __init__(self, model_id: str, mesh, *, text_dtype: str, dtype: str, attention="auto",
                 recorder: Recorder | None = None, vae_dtype: str = "float32", vae_conv: str = "auto",
                 expert_offload: bool = False, images: bool = False, **finetune):
        """`images`: also the image models, for image to video (image_encoder.ImageConditioner)."""
        self.recorder = recorder or Recorder()
        model_path = checkpoints.resolve_model(model_id)
        with self.recorder.section("text_encoder", "load"):
            self.encoder = load_encoder(model_path, mesh, text_dtype)
        self.conditioner = load_image_conditioner(model_path, mesh, text_dtype, self.recorder) if images else None
        self.image_tensors = None  # stage 1's image tensors of the last run
        with self.recorder.section("transformer", "load"):
            self.denoiser = load_denoiser(model_path, mesh, dtype, attention, expert_offload=expert_offload,
                                          **finetune)
        with self.recorder.section("vae", "load"):
            self.decoder = load_decoder(model_path, mesh, vae_dtype, vae_conv)

    def run(self, cfg: GenerationConfig, *, progress: bool = True, uint8: bool = False):
        """(prompt_embeds, negative_prompt_embeds, latents [V ...], frames [V ...]) for every video of `cfg`;
        frames are float32 in [0, 1], or with `uint8` converted on device as the mp4 writer would."""
        section = self.recorder.section
        with section("text_encoder", "run"):
            prompt_embeds, negative_embeds = encode(self.encoder, cfg)
        image = self.image_tensors = self.encode_images(cfg)  # the last run's, for --save_intermediates
        with section("transformer", "run"):
            self.denoiser.step_seconds.clear()
            self.denoiser.cache_log.clear()
            latents = denoise(self.denoiser, cfg, prompt_embeds, negative_embeds, progress=progress, image=image)
        steps = self.denoiser.step_seconds
        self.recorder.add_steps("transformer", steps, len(steps))
        self.recorder.add_cache("transformer", self.denoiser.cache_log)
        with section("vae", "run"):
            frames = np.concatenate([self.decoder.decode(x[None], uint8=uint8) for x in latents])
        return prompt_embeds, negative_embeds, latents, frames

    def warmup(self, cfg: GenerationConfig, num_steps: int, *, uint8: bool = False):
        """Compiles every program `run(cfg, uint8=uint8)` uses: all prompts encoded, one batch denoised for
        `num_steps` (batches are padded to one shape), one video decoded."""
        with self.recorder.section("text_encoder", "warmup"):
            prompt_embeds, negative_embeds = encode(self.encoder, cfg)
        image = self.encode_images(cfg)
        latents = []
        with self.recorder.section("transformer", "warmup"):
            first = plan(cfg)[:1]
            sweep.denoise_videos(self.denoiser, cfg, prompt_embeds, negative_embeds, first, plan(cfg),
                                 lambda group, x: latents.append(x), num_steps=num_steps, progress=False, image=image)
        with self.recorder.section("vae", "warmup"):
            self.decoder.decode(latents[0], uint8=uint8)

    def encode_images(self, cfg: GenerationConfig) -> dict | None:
        """Stage 1's image tensors for `cfg`'s images (None for text to video), each image file read again."""
        if not cfg.images:
            return None
        from tpu_wan.models.image_encoder import ImageRequest, read_images

        request = ImageRequest(cfg.images, cfg.last_images, *cfg.image_size)
        return self.conditioner.encode(request, read_images(request))

    def measure_models(self) -> None:
        """Weight bytes of the three models and temp bytes of the programs they ran (after the runs)."""
        add_stage1_models(self.recorder, self.encoder, self.conditioner)
        self.recorder.add_model("transformer", self.denoiser.weights, self.denoiser.programs, self.denoiser.compile_s)
        self.recorder.add_swaps("transformer", self.denoiser.swap_seconds)
        self.recorder.add_model("vae", self.decoder.params, self.decoder.programs, self.decoder.compile_s)


@dataclasses.dataclass
class GenerateResult:
    config: GenerationConfig
    videos: list[Path]
    metrics: dict  # the metrics.json document (tpu_wan.runtime.profiling.metrics_dict)


def generate(
    model_id: str,
    prompts: list[str],
    negative_prompt: str,
    settings: Stage2Settings,
    *,
    output_video: str | Path | None = None,
    output_dir: str | Path | None = None,
    max_sequence_length: int = 512,
    fps: int | None = None,
    vae_dtype: str = "float32",
    vae_conv: str = "auto",
    dp: int | None = None,
    tp: int | None = None,
    warmup_steps: int = 2,
    num_iterations: int = 1,
    profile_dir: str | Path | None = None,
    preview: bool = False,
    save_intermediates: str | Path | None = None,
    non_strict: bool = False,
    expert_offload: bool = False,
    images: list[str] | None = None,
    last_images: list[str] | None = None,
) -> GenerateResult:
    """All three stages in one process: load, warm up (compiles everything), then `num_iterations` timed runs
    (the last one traced into `profile_dir` if given); writes the videos of the last run. `fps` None: the
    model's; `expert_offload`: two experts, the idle one in host memory; `images`, `last_images`: image to video,
    one path per prompt (pipeline.run_stage1's)."""
    from tpu_wan.core import preview as preview_lib
    from tpu_wan.core import video
    from tpu_wan.runtime import profiling

    start = time.perf_counter()
    mesh = make_mesh(dp, tp)
    size = (settings.height, settings.width, settings.frames) if images else (None, None, None)  # stage 2's flags
    request = image_request(model_id, len(prompts), images, last_images, size)
    base = GenerationConfig(
        model_id=model_id, prompts=tuple(prompts), negative_prompt=negative_prompt,
        max_sequence_length=max_sequence_length, vae_dtype=vae_dtype,
        fps=model_preset(model_id).fps if fps is None else fps,
    )
    if request is not None:
        from tpu_wan.models.image_encoder import read_images

        read_images(request)  # a bad image file is refused before any model loads
        base = with_images(base, request)
    cfg = resolve_stage2(base, settings, mesh)
    check_offload(cfg, expert_offload)
    cfg = cfg.replace(text_dtype=cfg.stage2.dtype)
    paths = video_paths(cfg, output_video, output_dir)
    model_path = checkpoints.resolve_model(model_id)  # what the config files decide, before any model loads
    check_heads(mesh, checkpoints.read_config(model_path, "text_encoder", ("num_heads",))["num_heads"], "text encoder")
    preflight.check_stage2_run(model_path, cfg, mesh)
    gen = Generator(model_id, mesh, text_dtype=cfg.text_dtype, dtype=cfg.stage2.dtype, attention=cfg.stage2.attention,
                    vae_dtype=vae_dtype, vae_conv=vae_conv, expert_offload=expert_offload,
                    images=request is not None, **finetune_settings(cfg, non_strict))
    # Only --save_intermediates keeps the float frames; the mp4 needs uint8, converted on device (a quarter of
    # the bytes to move to the host).
    uint8 = not save_intermediates
    if warmup_steps:
        gen.warmup(cfg, min(warmup_steps, cfg.stage2.num_inference_steps), uint8=uint8)
    for i in range(num_iterations):
        with _trace(profile_dir if i == num_iterations - 1 else None):
            prompt_embeds, negative_embeds, latents, frames = gen.run(cfg, uint8=uint8)
    io = gen.recorder.section
    with io("vae", "io"):
        for path, f in zip(paths, frames):
            video.write_video(path, f, cfg.fps)
            if preview:
                preview_lib.write_preview(preview_lib.preview_path(path), video.to_uint8(f))
    if save_intermediates:
        folder = Path(save_intermediates)
        videos = plan(cfg)
        with io("text_encoder", "io"):
            artifacts.save_embeddings(folder, prompt_embeds, negative_embeds, metadata={"model_id": model_id},
                                      image=gen.image_tensors)
        with io("transformer", "io"):
            for v, x in zip(videos, latents):
                path = sweep.latents_path(folder, v, single=len(videos) == 1)
                artifacts.save_latents(path, x[None], metadata=sweep.video_metadata(cfg, v))
            artifacts.save_config(folder, cfg.to_json_dict())
        with io("vae", "io"):
            artifacts.save_frames(folder, frames)
    total = time.perf_counter() - start
    gen.measure_models()
    # process start to the end of the first denoising step (warmup's, else the first run's): startup, loading,
    # encoding and every compile on the way, what a user waits before the loop is running
    first_step = gen.denoiser.first_step_end - profiling.process_start_time()
    metrics = profiling.metrics_dict(gen.recorder, script="generate_flax.py", config=cfg.to_json_dict(), mesh=mesh,
                                     num_iterations=num_iterations, total_s=total, time_to_first_step_s=first_step)
    return GenerateResult(config=cfg, videos=paths, metrics=metrics)


def _trace(profile_dir):
    """A jax profiler trace into `profile_dir` (open it with TensorBoard's or XProf's profile plugin)."""
    if profile_dir is None:
        return contextlib.nullcontext()
    import jax

    return jax.profiler.trace(str(profile_dir))
