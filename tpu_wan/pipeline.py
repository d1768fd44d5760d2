"""The three stages as library calls, and `Generator`, which keeps all three models loaded for generate_flax.py.

run_stage1 / run_stage2 / run_stage3 read and write the artifact folder (formats in tpu_wan.artifacts);
`Generator` does the same work in memory. Both go through the same encode / denoise / decode methods, so the
staged and the one-process paths compute the same numbers.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import numpy as np

from tpu_wan import artifacts, checkpoints, config as config_lib, schedulers
from tpu_wan.config import ConfigError, GenerationConfig
from tpu_wan.mesh import make_mesh

log = logging.getLogger("tpu_wan")


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 N(0, 1) latents drawn exactly as diffusers' prepare_latents draws them for this seed."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator("cpu").manual_seed(seed)
    return randn_tensor(shape, generator=generator, dtype=torch.float32).numpy()


@dataclasses.dataclass(frozen=True)
class SamplingArgs:
    """Stage-2 settings as the user gave them; None means 'the default for this size / platform'."""

    height: int = 720
    width: int = 1280
    frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    seed: int = 42
    flow_shift: float | None = None
    sample_solver: str = "unipc"
    dtype: str | None = None
    init_latents: str | None = None


def sampling_args(namespace) -> SamplingArgs:
    """SamplingArgs from parsed flags of the same names."""
    return SamplingArgs(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(SamplingArgs)})


def attention_options(namespace):
    """AttentionOptions from the --attention / --k_smooth / --window_size / block-size flags."""
    from tpu_wan.attention import AttentionOptions

    return AttentionOptions(
        choice=namespace.attention, k_smooth=namespace.k_smooth, window_size=namespace.window_size,
        bq=namespace.bqsize, bkv=namespace.bkvsize, bkv_compute=namespace.bkvcomputesize,
    )


def resolve_sampling(cfg: GenerationConfig, args: SamplingArgs, mesh) -> GenerationConfig:
    """The config with every stage-2 setting decided (defaults filled in) and validated."""
    config_lib.validate_video_size(args.height, args.width, args.frames)
    shift = args.flow_shift if args.flow_shift is not None else config_lib.default_flow_shift(args.height, args.width)
    return cfg.replace(
        height=args.height,
        width=args.width,
        frames=args.frames,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        flow_shift=shift,
        sample_solver=args.sample_solver,
        dtype=args.dtype or config_lib.default_dtype(jax.default_backend()),
        init_latents=args.init_latents,
        mesh=(mesh.shape["dp"], mesh.shape["tp"]),
    )


def starting_latents(cfg: GenerationConfig, channels: int) -> np.ndarray:
    """--init_latents if given (checked against the requested size), else the seed's noise."""
    shape = config_lib.latent_shape(len(cfg.prompts), cfg.height, cfg.width, cfg.frames, channels)
    if cfg.init_latents is None:
        return initial_noise(cfg.seed, shape)
    latents = artifacts.load_latents(cfg.init_latents, require_schema=False)
    if latents.shape != shape:
        raise ConfigError(
            f"--init_latents {cfg.init_latents}: expected shape {shape} for {len(cfg.prompts)} prompt(s) at "
            f"{cfg.width}x{cfg.height}x{cfg.frames}, found {latents.shape}"
        )
    return latents


def check_embeddings(prompt_embeds: np.ndarray, cfg: GenerationConfig, text_dim: int) -> None:
    expected = (len(cfg.prompts), cfg.max_sequence_length, text_dim)
    if prompt_embeds.shape != expected:
        raise ConfigError(
            f"{artifacts.EMBEDDINGS_FILE}: expected shape {expected} (prompts, max_sequence_length, transformer "
            f"text_dim), found {prompt_embeds.shape}"
        )
    if not np.isfinite(prompt_embeds.astype(np.float32)).all():
        raise ConfigError(f"{artifacts.EMBEDDINGS_FILE}: expected finite values, found NaN or Inf (rerun stage 1)")


def _encoder(model_path, mesh, dtype):
    from tpu_wan.text_encoder import TextEncoder

    return TextEncoder(model_path, mesh, dtype)


def _denoiser(model_path, mesh, dtype, attention):
    from tpu_wan.transformer import Denoiser

    return Denoiser(model_path, mesh, dtype, attention)


def _decoder(model_path, mesh):
    from tpu_wan.vae import VaeDecoder

    return VaeDecoder(model_path, mesh)


def encode(encoder, cfg: GenerationConfig) -> tuple[np.ndarray, np.ndarray]:
    from tpu_wan.text_encoder import encode_prompts

    return encode_prompts(encoder, cfg.prompts, cfg.negative_prompt, cfg.max_sequence_length)


def denoise(denoiser, cfg: GenerationConfig, prompt_embeds, negative_prompt_embeds, *, num_steps=None, progress=True):
    check_embeddings(prompt_embeds, cfg, denoiser.config.text_dim)
    schedule = schedulers.make_schedule(cfg.sample_solver, cfg.num_inference_steps, cfg.flow_shift)
    latents = starting_latents(cfg, denoiser.config.in_channels)
    return denoiser.denoise(
        latents, prompt_embeds, negative_prompt_embeds, schedule, cfg.guidance_scale,
        num_steps=num_steps, progress=progress,
    )


def run_stage1(
    model_id: str,
    prompts: list[str],
    negative_prompt: str,
    output_dir: str | Path,
    *,
    max_sequence_length: int = 512,
    dtype: str | None = None,
    dp: int | None = None,
    tp: int | None = None,
) -> GenerationConfig:
    """Encodes the prompts; writes stage1_embeddings.safetensors and generation_config.json."""
    dtype = dtype or config_lib.default_dtype(jax.default_backend())
    cfg = GenerationConfig(
        model_id=model_id, prompts=tuple(prompts), negative_prompt=negative_prompt,
        max_sequence_length=max_sequence_length, text_dtype=dtype,
    )
    mesh = make_mesh(dp, tp)
    model_path = checkpoints.resolve_model(model_id)
    prompt_embeds, negative_embeds = encode(_encoder(model_path, mesh, dtype), cfg)
    artifacts.save_embeddings(output_dir, prompt_embeds, negative_embeds, metadata={"model_id": model_id})
    artifacts.save_config(output_dir, cfg.to_json_dict())
    return cfg


def run_stage2(
    input_dir: str | Path,
    sampling: SamplingArgs,
    *,
    output_dir: str | Path | None = None,
    dp: int | None = None,
    tp: int | None = None,
    attention="auto",
    warmup_steps: int = 0,
) -> GenerationConfig:
    """Denoises from the stage-1 embeddings; writes stage2_latents.safetensors and the updated config."""
    output_dir = Path(output_dir or input_dir)
    cfg = GenerationConfig.from_json_dict(artifacts.load_config(input_dir))
    prompt_embeds, negative_embeds = artifacts.load_embeddings(input_dir)
    mesh = make_mesh(dp, tp)
    cfg = resolve_sampling(cfg, sampling, mesh)
    denoiser = _denoiser(checkpoints.resolve_model(cfg.model_id), mesh, cfg.dtype, attention)
    if warmup_steps:
        denoise(denoiser, cfg, prompt_embeds, negative_embeds, num_steps=warmup_steps, progress=False)
    latents = denoise(denoiser, cfg, prompt_embeds, negative_embeds)
    artifacts.save_latents(output_dir / artifacts.LATENTS_FILE, latents, metadata={"model_id": cfg.model_id})
    artifacts.save_config(output_dir, cfg.to_json_dict())
    return cfg


def run_stage3(
    input_dir: str | Path,
    *,
    output_video: str | Path | None = None,
    fps: int | None = None,
    save_frames: bool = False,
    dp: int | None = None,
    tp: int | None = None,
) -> list[Path]:
    """Decodes the stage-2 latents; writes the mp4(s) (and stage3_frames.safetensors with save_frames)."""
    input_dir = Path(input_dir)
    cfg = GenerationConfig.from_json_dict(artifacts.load_config(input_dir))
    latents = artifacts.load_latents(input_dir / artifacts.LATENTS_FILE)
    cfg = cfg.replace(fps=fps or cfg.fps)
    output_video = Path(output_video or input_dir / artifacts.VIDEO_FILE)
    frames = _decoder(checkpoints.resolve_model(cfg.model_id), make_mesh(dp, tp)).decode(latents)
    if save_frames:
        artifacts.save_frames(input_dir, frames)
    paths = write_videos(output_video, frames, cfg.fps)
    artifacts.save_config(input_dir, cfg.to_json_dict())
    return paths


def write_videos(output_video: str | Path, frames: np.ndarray, fps: int) -> list[Path]:
    """One mp4 per video: `output_video` itself for one, `<stem>_<i><suffix>` beside it for several."""
    from tpu_wan import video

    output_video = Path(output_video)
    if frames.shape[0] == 1:
        return [video.write_video(output_video, frames[0], fps)]
    return [
        video.write_video(output_video.with_name(f"{output_video.stem}_{i}{output_video.suffix}"), f, fps)
        for i, f in enumerate(frames)
    ]


class Generator:
    """All three models loaded once on one mesh: encode -> denoise -> decode in memory (generate_flax.py)."""

    def __init__(self, model_id: str, mesh, *, text_dtype: str, dtype: str, attention="auto", timer=None):
        from tpu_wan.profiling import Timer

        self.timer = timer or Timer()
        model_path = checkpoints.resolve_model(model_id)
        with self.timer("load text encoder"):
            self.encoder = _encoder(model_path, mesh, text_dtype)
        with self.timer("load transformer"):
            self.denoiser = _denoiser(model_path, mesh, dtype, attention)
        with self.timer("load vae"):
            self.decoder = _decoder(model_path, mesh)

    def run(self, cfg: GenerationConfig, *, num_steps: int | None = None, progress: bool = True, prefix: str = ""):
        """(prompt_embeds, negative_prompt_embeds, latents, frames) for `cfg`, each stage timed."""
        with self.timer(f"{prefix}text encoder"):
            prompt_embeds, negative_embeds = encode(self.encoder, cfg)
        with self.timer(f"{prefix}transformer"):
            latents = denoise(self.denoiser, cfg, prompt_embeds, negative_embeds, num_steps=num_steps, progress=progress)
        with self.timer(f"{prefix}vae"):
            frames = self.decoder.decode(latents)
        return prompt_embeds, negative_embeds, latents, frames


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
    output_video: str | Path,
    max_sequence_length: int = 512,
    fps: int = 16,
    dp: int | None = None,
    tp: int | None = None,
    attention="auto",
    warmup_steps: int = 2,
    save_intermediates: str | Path | None = None,
) -> GenerateResult:
    """All three stages in one process: load, warm up (compiles everything), then the timed run."""
    mesh = make_mesh(dp, tp)
    cfg = resolve_sampling(
        GenerationConfig(
            model_id=model_id, prompts=tuple(prompts), negative_prompt=negative_prompt,
            max_sequence_length=max_sequence_length, fps=fps,
        ),
        sampling,
        mesh,
    )
    cfg = cfg.replace(text_dtype=cfg.dtype)
    gen = Generator(model_id, mesh, text_dtype=cfg.text_dtype, dtype=cfg.dtype, attention=attention)
    if warmup_steps:
        gen.run(cfg, num_steps=min(warmup_steps, cfg.num_inference_steps), progress=False, prefix="warmup: ")
    prompt_embeds, negative_embeds, latents, frames = gen.run(cfg)
    with gen.timer("write video"):
        videos = write_videos(output_video, frames, cfg.fps)
    if save_intermediates:
        artifacts.save_embeddings(save_intermediates, prompt_embeds, negative_embeds, metadata={"model_id": model_id})
        artifacts.save_latents(Path(save_intermediates) / artifacts.LATENTS_FILE, latents, metadata={"model_id": model_id})
        artifacts.save_frames(save_intermediates, frames)
        artifacts.save_config(save_intermediates, cfg.to_json_dict())
    per_step = gen.timer.seconds["transformer"] / cfg.num_inference_steps
    return GenerateResult(config=cfg, videos=videos, timer=gen.timer, seconds_per_step=per_step)
