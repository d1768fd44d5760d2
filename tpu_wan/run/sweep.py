"""Stage 2 over many videos: fixed-size batches (one compiled program), each saved as it lands, resumable.

A folder's stage-2 results are tied to a signature, every setting that shapes the latents apart from the seed.
A rerun with the same signature skips the videos already on disk; a rerun with another signature is refused
(naming what differs) unless --overwrite, so results of different settings never mix in one folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tpu_wan.core import artifacts
from tpu_wan.core.batch import Video, batches
from tpu_wan.core.config import IMAGE_KEYS, OPTIONAL_KEYS, ConfigError, GenerationConfig, latent_channels
from tpu_wan.runtime import distributed
from tpu_wan.sampling import schedulers

log = logging.getLogger("tpu_wan")
# A folder promises that every video in it is what its config computes, bit for bit (a sweep video equals the
# single run with its prompt and seed). So the signature holds what changes the math (size, steps, the local
# attention window, ...) and also what changes only the rounding: dtype, mesh and batch size, and likewise the
# attention backend, k_smooth (an exact shift of the keys, rounded differently) and the kernel block sizes
# (another summation order). A rerun that changes any of them is refused rather than mixed into the folder.
SIGNATURE_FIELDS = (
    "model_id", "prompts", "negative_prompt", "max_sequence_length", "text_dtype", "height", "width", "frames",
    "num_inference_steps", "guidance_scale", "flow_shift", "sample_solver", "dtype", "init_latents",
    "transformer_checkpoint", "checkpoint_key", "mesh", "batch_size",
    "attention", "k_smooth", "window_size", "bqsize", "bkvsize", "bkvcomputesize", "sharding",
)


def signature(cfg: GenerationConfig) -> dict:
    """SIGNATURE_FIELDS, and the optional keys a run records (Wan 2.2's guidance pair, boundary, experts' steps,
    per-token timesteps and VAE; LoRAs by name, sha256 and scale; distilled steps; the step cache; the images by
    path, sha256 and size): absent from a plain Wan 2.1 config, so its digests are unchanged."""
    data = cfg.to_json_dict()
    return {**{k: data[k] for k in SIGNATURE_FIELDS},
            **{k: data[k] for k in (*OPTIONAL_KEYS, *IMAGE_KEYS) if k in data}}


def signature_digest(cfg: GenerationConfig) -> str:
    return hashlib.sha256(json.dumps(signature(cfg), sort_keys=True).encode()).hexdigest()[:16]


def latents_path(folder: Path, video: Video, single: bool) -> Path:
    """One video: the spec's stage2_latents.safetensors; several: stage2_latents/<name>.safetensors."""
    return Path(folder) / artifacts.LATENTS_FILE if single else artifacts.video_latents_path(folder, video.name)


def video_metadata(cfg: GenerationConfig, video: Video) -> dict[str, str]:
    return {
        "model_id": cfg.model_id, "prompt": cfg.prompts[video.prompt_index], "seed": str(video.seed),
        "signature": signature_digest(cfg),
    }


def _is_done(path: Path, cfg: GenerationConfig, video: Video) -> bool:
    """A finished file for this video made with these settings (its metadata says so)."""
    if not path.is_file():
        return False
    try:
        meta = artifacts.read_metadata(path)
    except artifacts.ArtifactError:
        return False
    return all(meta.get(k) == v for k, v in video_metadata(cfg, video).items())


def pending(folder: Path, cfg: GenerationConfig, videos: Sequence[Video], overwrite: bool) -> list[Video]:
    """The videos still to compute in `folder`; refuses a folder holding results of other settings."""
    single = len(videos) == 1
    if overwrite:
        return list(videos)  # the old files go in clear_previous, once the run is known to start
    previous = _previous_signature(folder)
    has_results = (Path(folder) / artifacts.LATENTS_FILE).is_file() or bool(artifacts.list_video_latents(folder))
    if previous is not None and has_results and previous != signature(cfg):
        diffs = [f"{k}: {_short(previous.get(k))} -> {_short(v)}" for k, v in signature(cfg).items()
                 if previous.get(k) != v]
        raise ConfigError(
            f"{folder} holds stage-2 results made with other settings ({'; '.join(diffs)}): expected the same "
            "settings to resume, pass --overwrite to redo or choose another --output_dir"
        )
    todo = [v for v in videos if not _is_done(latents_path(folder, v, single), cfg, v)]
    if len(todo) < len(videos):
        log.info("resuming: %d of %d videos already in %s", len(videos) - len(todo), len(videos), folder)
    return todo


def _short(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters (a prompt list can be pages long)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    end = "...]" if text.endswith("]") else "..."
    return text[: limit - len(end) - 1] + end


def clear_previous(folder: Path) -> None:
    """Removes a previous run's per-video latents (--overwrite), so no stale video outlives its settings."""
    if not artifacts.writes_enabled():
        return
    shutil.rmtree(Path(folder) / artifacts.LATENTS_DIR, ignore_errors=True)


def _previous_signature(folder: Path) -> dict | None:
    if not (Path(folder) / artifacts.CONFIG_FILE).is_file():
        return None
    data = artifacts.load_config(folder)
    if data.get("height") is None:
        return None  # stage 1 only
    previous = GenerationConfig.from_json_dict(data)
    return signature(previous)


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 N(0, 1) latents [1, C, F, H, W] drawn exactly as diffusers' prepare_latents draws them for this seed
    (a NoiseStream's first draw)."""
    return NoiseStream([seed], shape[1:]).next()


class NoiseStream:
    """Each video's N(0, 1) draws from one torch CPU generator seeded with its seed, in order: its initial latents
    (the first draw, `initial_noise`'s), then one draw of the latent shape per re-noise of a "distill" schedule, as
    lightx2v's step-distill scheduler draws from its one seeded generator. Drawn on the host as the steps run; a
    video's draws depend on its seed alone, so a sweep video's noise is its single run's."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...]):
        import torch

        self._generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        self._shape = (1, *shape)  # [1, C, F, H, W] per video, as diffusers' prepare_latents draws a video's noise

    def next(self) -> np.ndarray:
        """[videos, C, F, H, W] float32: each video's next draw."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        return np.concatenate([randn_tensor(self._shape, generator=g, dtype=torch.float32).numpy()
                               for g in self._generators])


def starting_latents(cfg: GenerationConfig, videos: Sequence[Video], plan: Sequence[Video], shape,
                     stream: NoiseStream | None = None) -> np.ndarray:
    """[len(videos), C, F, H, W]: each video's rows of --init_latents (plan order), else its seed's noise (`stream`'s
    first draw when given; with --init_latents that draw is still made and dropped, so the stream's later draws are
    the same wherever the start came from)."""
    if cfg.stage2.init_latents is None:
        return (stream or NoiseStream([v.seed for v in videos], shape)).next()
    if stream is not None:
        stream.next()  # the seed's initial draw, dropped: the stream's later draws stay the seed's
    latents = artifacts.load_latents(cfg.stage2.init_latents, require_schema=False)
    expected = (len(plan), *shape)
    if latents.shape != expected:
        raise ConfigError(
            f"--init_latents {cfg.stage2.init_latents}: expected shape {expected} for {len(plan)} video(s) at "
            f"{cfg.stage2.video_size}, found {latents.shape}"
        )
    return latents[[plan.index(v) for v in videos]]


def image_rows(image: dict | None, rows: list[int]) -> dict | None:
    """The Denoiser's image inputs for a batch whose rows are these prompts (None for text to video)."""
    if not image:
        return None
    names = {"image_condition": "condition", "image_embeds": "embeds"}
    return {names[key]: value[rows] for key, value in image.items()}


def denoise_videos(
    denoiser,
    cfg: GenerationConfig,
    prompt_embeds: np.ndarray,
    negative_embeds: np.ndarray,
    videos: Sequence[Video],
    plan: Sequence[Video],
    on_batch: Callable[[list[Video], np.ndarray], None],
    *,
    num_steps: int | None = None,
    progress: bool = True,
    image: dict | None = None,
) -> None:
    """Denoises `videos` in batches of cfg.stage2.batch_size; `on_batch(videos, latents)` gets each finished batch.
    `image`: stage 1's image tensors (artifacts.IMAGE_TENSORS), one row per prompt, for image to video.

    The last batch is padded by repeating its last video, so every batch has the same shape and the step
    program compiles once for the whole sweep. A "distill" schedule's fresh noise comes from each video's
    NoiseStream, one draw per re-noise as the steps run."""
    s = cfg.stage2
    schedule = schedulers.make_schedule(s.sample_solver, s.num_inference_steps, s.flow_shift,
                                        denoising_steps=s.denoising_steps)
    shape = s.latent_shape(1, latent_channels(denoiser.config))[1:]
    groups = batches(videos, s.batch_size)
    for group in distributed.progress(groups, show=progress and len(groups) > 1, desc="batches", unit="batch"):
        padded = group + [group[-1]] * (s.batch_size - len(group))
        rows = [v.prompt_index for v in padded]
        stream = NoiseStream([v.seed for v in padded], shape) if schedule.takes_noise else None
        latents = denoiser.denoise(
            starting_latents(cfg, padded, plan, shape, stream), prompt_embeds[rows],
            negative_embeds[rows] if cfg.do_classifier_free_guidance else None,
            schedule, s.guidance_scale, guidance_scale_2=s.guidance_scale_2, expert_steps=s.expert_steps,
            num_steps=num_steps, progress=progress, sharding=s.sharding_mode,
            noise=None if stream is None else lambda step: stream.next(), cache=s.cache,
            image=image_rows(image, rows),
        )
        on_batch(group, latents[: len(group)])
