"""GenerationConfig: the schema of generation_config.json, its defaults and its validation.

Each stage fills in what it decides (stage 1: model and prompts; stage 2: size, steps, seed, solver; stage 3:
fps) and writes the whole config back, so the file always says how its folder's artifacts were made.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from tpu_wan.core.errors import AttentionError, ConfigError

# The negative prompt of the Wan 2.1 model card (diffusers' WanPipeline example), the model's trained default.
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards"
)
DEFAULT_MODEL_ID = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
DEFAULT_PROMPT = "A cat playing piano in a jazz club, cinematic lighting"
DTYPES = ("float32", "bfloat16")
SOLVERS = ("unipc", "dpm++", "euler", "distill", "distill_euler")
# lightx2v's step-distilled samplers (tpu_wan.sampling.schedulers): a list of training timesteps sets the steps.
# Unless given, they run lightx2v's 4-step Wan models' list and shift, without CFG (the models are CFG-distilled).
DISTILL_SOLVERS = ("distill", "distill_euler")
DEFAULT_DENOISING_STEPS = (1000, 750, 500, 250)
DISTILL_GUIDANCE = 1.0
DISTILL_FLOW_SHIFT = 5.0
NUM_TRAIN_TIMESTEPS = 1000  # the Wan models' training timesteps, the range of --denoising_steps
ATTENTION_CHOICES = ("auto", "custom", "splash", "xla", "cudnn")
# How the DiT is split over the mesh (tpu_wan.runtime.parallelism); the config records the mode that ran, never 'auto'.
SHARDING_CHOICES = ("auto", "megatron", "sequence")
VAE_SPATIAL = 8  # the Wan 2.1 VAE downsamples H and W by 8 ...
VAE_TEMPORAL = 4  # ... and frames by 4, keeping the first frame: F = (frames - 1) / 4 + 1
SIZE_MULTIPLE = VAE_SPATIAL * 2  # the DiT's 1x2x2 patches need latent H and W even
# Each VAE's spatial compression: Wan 2.2's z48 VAE (TI2V-5B) patches 2x2 pixels before 8x, so 16x; its sizes are
# multiples of 32 (tpu_wan.models.kinds.ModelKind.size_multiple).
VAE_SPATIAL_BY_KIND = {"wan2.1": VAE_SPATIAL, "wan2.2": 16}


BLOCK_FLAGS = {"bq": "--bqsize", "bkv": "--bkvsize", "bkv_compute": "--bkvcomputesize"}
# The choices each kernel setting acts on ('auto' sends every call to our kernel on TPU); anywhere else
# it would change nothing but the settings a sweep folder is matched by, so it is refused.
TAKES_K_SMOOTH = ("auto", "custom")
TAKES_BLOCKS = ("auto", "custom", "splash")


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """How attention runs. Block sizes None: per-shape defaults (tpu_wan.kernels.kernel_tiling.default_block_sizes)."""

    choice: str = "auto"
    k_smooth: bool = False
    window_size: int | None = None  # self-attention only: query i sees keys |i - j| <= window_size
    bq: int | None = None
    bkv: int | None = None
    bkv_compute: int | None = None

    def __post_init__(self):
        if self.choice not in ATTENTION_CHOICES:
            raise AttentionError(f"attention must be one of {ATTENTION_CHOICES}, found {self.choice!r}")
        if self.window_size is not None and self.window_size < 0:
            raise AttentionError(f"window_size must be >= 0, found {self.window_size}")
        for name in ("bq", "bkv", "bkv_compute"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8):
                raise AttentionError(f"{BLOCK_FLAGS[name]} must be a positive multiple of 8, found {value}")
        if self.bkv is not None and self.bkv_compute is not None and self.bkv % self.bkv_compute:
            raise AttentionError(f"--bkvsize must be a multiple of --bkvcomputesize, found {self.bkv} and "
                                 f"{self.bkv_compute}")
        if self.k_smooth and self.choice not in TAKES_K_SMOOTH:
            raise AttentionError(f"--k_smooth acts on our kernel only: expected --attention {' or '.join(TAKES_K_SMOOTH)}, "
                                 f"found --attention {self.choice}")
        given = [BLOCK_FLAGS[n] for n in BLOCK_FLAGS if getattr(self, n) is not None]
        if given and self.choice not in TAKES_BLOCKS:
            raise AttentionError(f"{', '.join(given)} set the Pallas kernels' blocks: expected --attention "
                                 f"{', '.join(TAKES_BLOCKS)}, found --attention {self.choice}")

    def for_choice(self, choice: str) -> "AttentionOptions":
        """These settings for `choice`, without the kernel settings that do not act on it (to compare choices)."""
        blocks = {n: getattr(self, n) if choice in TAKES_BLOCKS else None for n in BLOCK_FLAGS}
        return dataclasses.replace(self, choice=choice, k_smooth=self.k_smooth and choice in TAKES_K_SMOOTH, **blocks)


# generation_config.json's attention keys (the flags' names) -> AttentionOptions fields
ATTENTION_KEYS = {"attention": "choice", "k_smooth": "k_smooth", "window_size": "window_size", "bqsize": "bq",
                  "bkvsize": "bkv", "bkvcomputesize": "bkv_compute"}


def cache_root() -> Path:
    """Where tpu_wan keeps what it builds or caches (tiny checkpoints, compiled programs): $TPU_WAN_CACHE, else
    ~/.cache/tpu_wan."""
    return Path(os.environ.get("TPU_WAN_CACHE") or Path.home() / ".cache" / "tpu_wan")


def json_repr(value: Any, limit: int = 60) -> str:
    import json

    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """A model's default video settings (Wan's own configs for it); explicit flags override them."""

    height: int
    width: int
    frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    guidance_scale_2: float | None = None  # two experts: the low-noise one's (None: guidance_scale, as diffusers)
    flow_shift: float | None = None  # None: default_flow_shift of the resolution (Wan 2.1)
    fps: int = 16


# Wan's trained resolutions and sampling defaults: Wan 2.1 14B at 720p (and 480p), 1.3B at 480p; Wan 2.2 A14B at
# 720p (and 480p) with its two experts' guidance 4.0 / 3.0 and shift 12.0; TI2V-5B at 1280x704, 24 fps.
MODEL_PRESETS = {
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": ModelPreset(height=720, width=1280),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": ModelPreset(height=480, width=832),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": ModelPreset(height=720, width=1280, num_inference_steps=40,
                                                    guidance_scale=4.0, guidance_scale_2=3.0, flow_shift=12.0),
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": ModelPreset(height=704, width=1280, frames=121, flow_shift=5.0, fps=24),
    # image to video: Wan 2.1 I2V samples 40 steps (shift by resolution as T2V); Wan 2.2 I2V-A14B's config: 40 steps,
    # guidance 3.5 / 3.5, shift 5.0 (wan/configs/wan_i2v_A14B.py)
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": ModelPreset(height=480, width=832, num_inference_steps=40),
    "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers": ModelPreset(height=720, width=1280, num_inference_steps=40),
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": ModelPreset(height=720, width=1280, num_inference_steps=40,
                                                    guidance_scale=3.5, guidance_scale_2=3.5, flow_shift=5.0),
    "tiny-random": ModelPreset(height=64, width=96, frames=9, num_inference_steps=10),
    "tiny-random-a14b": ModelPreset(height=64, width=96, frames=9, num_inference_steps=10, guidance_scale=4.0,
                                    guidance_scale_2=3.0, flow_shift=12.0),
    "tiny-random-ti2v": ModelPreset(height=64, width=96, frames=9, num_inference_steps=10, flow_shift=5.0, fps=24),
    "tiny-random-i2v": ModelPreset(height=64, width=96, frames=9, num_inference_steps=10),
    "tiny-random-i2v-a14b": ModelPreset(height=64, width=96, frames=9, num_inference_steps=10, guidance_scale=3.5,
                                        guidance_scale_2=3.5, flow_shift=5.0),
}
# A folder not named like a preset takes its family's (tpu_wan.models.kinds.ModelKind.family).
FAMILY_PRESETS = {"wan2.1": DEFAULT_MODEL_ID, "wan2.2-a14b": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
                  "wan2.2-ti2v": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
                  "wan2.1-i2v": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                  "wan2.2-i2v-a14b": "Wan-AI/Wan2.2-I2V-A14B-Diffusers"}


def preset_for(model_id: str | None, family: str = "wan2.1") -> ModelPreset:
    """The preset of a known model id (a local folder named like one counts), else its family's."""
    if model_id is not None:
        for name, preset in MODEL_PRESETS.items():
            if model_id == name or Path(model_id.rstrip("/")).name == name.split("/")[-1]:
                return preset
    return MODEL_PRESETS[FAMILY_PRESETS[family]]


def default_flow_shift(height: int, width: int) -> float:
    """Wan 2.1's sampling shift: 5.0 from 720p up, 3.0 below (480p)."""
    return 5.0 if min(height, width) >= 720 else 3.0


def default_dtype(platform: str) -> str:
    """bfloat16 where the hardware has fast bf16 matmuls (TPU, GPU), float32 on CPU."""
    return "float32" if platform == "cpu" else "bfloat16"


def latent_shape(num_videos: int, height: int, width: int, frames: int, channels: int = 16,
                 spatial: int = VAE_SPATIAL) -> tuple[int, ...]:
    """[V, C, F, H, W] of the latents for a video size, as diffusers' WanPipeline.prepare_latents (`spatial`: the
    VAE's compression, VAE_SPATIAL_BY_KIND)."""
    return (
        num_videos,
        channels,
        (frames - 1) // VAE_TEMPORAL + 1,
        height // spatial,
        width // spatial,
    )


def latent_channels(dit) -> int:
    """The channels a transformer (its config: a dict or diffusers' FrozenDict) denoises: its output's (an I2V
    model takes the image's as more input channels)."""
    get = dit.get if isinstance(dit, dict) else lambda key: getattr(dit, key, None)
    return get("out_channels") or get("in_channels")


def video_tokens(latents_shape: tuple[int, ...], patch_size) -> int:
    """L, the DiT's video tokens for latents [B C F H W]: F/pF x H/pH x W/pW (patch_size from its config.json)."""
    return math.prod(n // p for n, p in zip(latents_shape[2:], patch_size))


def validate_dtype(dtype: str, name: str = "dtype") -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"{name} must be one of {DTYPES}, found {dtype!r}")


def _positive_multiple(name: str, value: int | None, multiple: int) -> None:
    if value is not None and (value <= 0 or value % multiple):
        raise ConfigError(f"{name} must be a positive multiple of {multiple}, found {value}")


def _at_least(name: str, value: float | None, low: float) -> None:
    if value is not None and not value >= low:
        raise ConfigError(f"{name} must be >= {low}, found {value}")


@dataclasses.dataclass(frozen=True)
class LoraFile:
    """One --lora PATH[:SCALE]. The config records the file's name, sha256 and scale (not the folder it was in,
    so a resumed sweep matches the same file wherever it lies); `sha256` is None until stage 2 hashes it."""

    path: str
    scale: float = 1.0
    sha256: str | None = None

    def __post_init__(self):
        if not math.isfinite(self.scale):
            raise ConfigError(f"--lora {self.path}: expected a finite scale, found {self.scale}")

    @classmethod
    def parse(cls, text: str, flag: str = "--lora") -> "LoraFile":
        """'PATH' or 'PATH:SCALE' (a path may itself hold ':'; only a last part that is a number is a scale)."""
        path, sep, scale = text.rpartition(":")
        if sep:
            try:
                return cls(path, float(scale))
            except ValueError:
                pass
        if not text:
            raise ConfigError(f"{flag}: expected PATH[:SCALE], found an empty value")
        return cls(text)

    def to_json(self) -> dict[str, Any]:
        return {"file": Path(self.path).name, "scale": self.scale, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Any) -> "LoraFile":
        if not isinstance(data, dict) or not {"file", "scale"} <= set(data):
            raise ConfigError(f"generation_config.json: expected each LoRA as {{file, sha256, scale}}, found "
                              f"{json_repr(data)}")
        return cls(data["file"], data["scale"], data.get("sha256"))


@dataclasses.dataclass(frozen=True)
class Stage2Settings:
    """How stage 2 denoises. As asked for (cli.stage2_settings, library callers) None means 'the default for this
    model, size and platform'; as recorded in a GenerationConfig (pipeline.resolve_stage2) every setting is
    decided. Each given value is checked here, on construction, so a bad flag is refused before anything loads."""

    height: int | None = None  # None: the model preset's (config.MODEL_PRESETS)
    width: int | None = None
    frames: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seeds: tuple[int, ...] | None = None  # one video per (prompt, seed); None: (DEFAULT_SEED,)
    batch_size: int | None = None  # videos per denoising batch
    flow_shift: float | None = None
    sample_solver: str | None = None  # None: DEFAULT_SOLVER
    dtype: str | None = None
    init_latents: str | None = None
    transformer_checkpoint: str | None = None  # fine-tuned weights over the base transformer
    checkpoint_key: str | None = None
    mesh: tuple[int, int] | None = None  # (dp, tp) it ran on; decided from --dp / --tp
    # the --attention flags as given ('auto' picks a backend per call and platform); in the file as the six flat
    # keys ATTENTION_KEYS. None: AttentionOptions(); recorded None only in configs written before it was recorded.
    attention: AttentionOptions | None = None
    # the DiT's sharding mode (SHARDING_CHOICES): 'auto' (or None) asks parallelism.choose; recorded as decided,
    # None only in configs written before it was recorded, which ran megatron
    sharding: str | None = None
    # Wan 2.2 (WAN22_KEYS): recorded only for the models that have them, so a Wan 2.1 folder's files are as before.
    guidance_scale_2: float | None = None  # two experts: the low-noise expert's guidance (None: guidance_scale)
    boundary_ratio: float | None = None  # two experts: None: the folder's model_index.json's
    expert_steps: tuple[str, ...] | None = None  # two experts, decided: the expert each step ran, in step order
    expand_timesteps: bool | None = None  # True: one timestep per video token (TI2V), recorded from the folder
    vae: str | None = None  # the VAE the latents are for (VAE_SPATIAL_BY_KIND); None: Wan 2.1's
    # LoRAs, step-distilled sampling and step caches (OPTIONAL_KEYS): recorded only when set.
    loras: tuple[LoraFile, ...] | None = None  # fused into the (high-noise) transformer's weights at load
    loras_2: tuple[LoraFile, ...] | None = None  # two experts: fused into the low-noise one (transformer_2)
    denoising_steps: tuple[int, ...] | None = None  # distill solvers: the training timestep of each step
    cache: str | None = None  # step caching as --cache gives it ('first_block:0.05', 'mag:0.06'); None: off

    def __post_init__(self):  # named as the flags (and the file's keys) are
        # Sizes diffusers would silently round are refused: H, W multiples of 16, frames = 4n + 1.
        _positive_multiple("--height", self.height, SIZE_MULTIPLE)
        _positive_multiple("--width", self.width, SIZE_MULTIPLE)
        if self.frames is not None and (self.frames < 1 or (self.frames - 1) % VAE_TEMPORAL):
            raise ConfigError(f"--frames must be 4n+1 (1, 5, 9, ..., 81), found {self.frames}")
        _at_least("--num_inference_steps", self.num_inference_steps, 1)
        _at_least("--guidance_scale", self.guidance_scale, 0)
        if self.flow_shift is not None and not self.flow_shift > 0:
            raise ConfigError(f"--flow_shift must be > 0, found {self.flow_shift}")
        if self.seeds is not None and not self.seeds:
            raise ConfigError("expected at least one seed, found none")
        _at_least("--batch_size", self.batch_size, 1)
        if self.sample_solver is not None and self.sample_solver not in SOLVERS:
            raise ConfigError(f"--sample_solver must be one of {SOLVERS}, found {self.sample_solver!r}")
        self._check_denoising_steps()
        if self.dtype is not None:
            validate_dtype(self.dtype, "--dtype")
        if self.sharding is not None and self.sharding not in SHARDING_CHOICES:
            raise ConfigError(f"--sharding must be one of {SHARDING_CHOICES}, found {self.sharding!r}")
        _at_least("--guidance_scale_2", self.guidance_scale_2, 0)
        if self.boundary_ratio is not None and not 0 <= self.boundary_ratio <= 1:
            raise ConfigError(f"--boundary_ratio must be in [0, 1], found {self.boundary_ratio}")
        if self.vae is not None and self.vae not in VAE_SPATIAL_BY_KIND:
            raise ConfigError(f"vae must be one of {list(VAE_SPATIAL_BY_KIND)}, found {self.vae!r}")

    def _check_denoising_steps(self) -> None:
        """--denoising_steps only with a distill solver, strictly decreasing timesteps in 1..1000; the step count is
        the list's length (the default list's when none is given)."""
        steps = self.denoising_steps
        if self.sample_solver not in DISTILL_SOLVERS:
            if steps is not None:
                raise ConfigError(f"--denoising_steps: expected --sample_solver {' or '.join(DISTILL_SOLVERS)}, "
                                  f"found --sample_solver {self.sample_solver or DEFAULT_SOLVER}")
            return
        if steps is not None:
            whole = all(isinstance(t, int) and not isinstance(t, bool) for t in steps)
            if not steps or not whole or not all(1 <= t <= NUM_TRAIN_TIMESTEPS for t in steps) or any(
                    a <= b for a, b in zip(steps, steps[1:])):
                raise ConfigError(f"--denoising_steps: expected strictly decreasing whole numbers in "
                                  f"1..{NUM_TRAIN_TIMESTEPS}, found {' '.join(map(str, steps)) or 'none'}")
        steps = steps or DEFAULT_DENOISING_STEPS
        if self.num_inference_steps is not None and self.num_inference_steps != len(steps):
            raise ConfigError(f"--num_inference_steps: expected {len(steps)} with --sample_solver {self.sample_solver} "
                              f"(the length of --denoising_steps {' '.join(map(str, steps))}), found "
                              f"{self.num_inference_steps}")

    def latent_shape(self, num_videos: int, channels: int = 16) -> tuple[int, ...]:
        spatial = VAE_SPATIAL_BY_KIND[self.vae or "wan2.1"]
        return latent_shape(num_videos, self.height, self.width, self.frames, channels, spatial)

    @property
    def video_size(self) -> str:  # as the docs write sizes: WxHxF
        return f"{self.width}x{self.height}x{self.frames}"

    @property
    def sharding_mode(self) -> str:
        """The mode decided; configs written before it was recorded ran megatron."""
        return self.sharding or "megatron"

    def check_decided(self) -> None:
        """Refuses a record (a config's settings) that leaves a required setting or the sharding undecided."""
        missing = [name for name in DECIDED if getattr(self, name) is None]
        if missing:
            raise ConfigError(f"expected the stage-2 settings {missing} to be set, found them unset")
        if self.sharding == "auto":
            raise ConfigError(f"sharding must be one of {SHARDING_CHOICES[1:]}, found 'auto'")


STAGE2_KEYS = tuple(f.name for f in dataclasses.fields(Stage2Settings))
# Stage2Settings keys written only when set: what only Wan 2.2 models decide, LoRAs, distilled steps, caches. A run
# without them writes the same files as before they existed.
WAN22_KEYS = ("guidance_scale_2", "boundary_ratio", "expert_steps", "expand_timesteps", "vae")
OPTIONAL_KEYS = (*WAN22_KEYS, "loras", "loras_2", "denoising_steps", "cache")
# what every recorded Stage2Settings has decided (the others may stay None)
DECIDED = ("height", "width", "frames", "num_inference_steps", "guidance_scale", "seeds", "flow_shift",
           "sample_solver", "dtype")
DEFAULT_SEED = 42
DEFAULT_SOLVER = "unipc"


def solver_defaults(s: Stage2Settings) -> Stage2Settings:
    """`s` with a distill solver's defaults where it leaves them None: DEFAULT_DENOISING_STEPS, the step count
    their length, DISTILL_GUIDANCE and DISTILL_FLOW_SHIFT (ahead of the model preset's); other solvers: `s`."""
    if s.sample_solver not in DISTILL_SOLVERS:
        return s
    steps = s.denoising_steps or DEFAULT_DENOISING_STEPS
    return dataclasses.replace(
        s, denoising_steps=steps, num_inference_steps=len(steps),
        guidance_scale=DISTILL_GUIDANCE if s.guidance_scale is None else s.guidance_scale,
        flow_shift=DISTILL_FLOW_SHIFT if s.flow_shift is None else s.flow_shift)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Everything that determines a folder's artifacts. `stage2` stays None until stage 2 runs.

    In the file every setting is a top-level key (the flags' names), stage 2's included."""

    model_id: str
    prompts: tuple[str, ...]
    negative_prompt: str
    max_sequence_length: int = 512
    text_dtype: str = "float32"
    stage2: Stage2Settings | None = None
    # stage 3
    fps: int = 16
    vae_dtype: str = "float32"
    # image to video (IMAGE_KEYS, written only when set): stage 1's image per prompt (and last image), each file's
    # sha256, and the (height, width, frames) it encoded them at, which stage 2 then generates
    images: tuple[str, ...] | None = None
    image_sha256: tuple[str, ...] | None = None
    last_images: tuple[str, ...] | None = None
    last_image_sha256: tuple[str, ...] | None = None
    image_size: tuple[int, int, int] | None = None

    def __post_init__(self):
        if not self.prompts:
            raise ConfigError("expected at least one prompt, found none")
        for name in ("images", "image_sha256", "last_images", "last_image_sha256"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.prompts):
                raise ConfigError(f"{name}: expected one per prompt ({len(self.prompts)}), found {len(value)}")
        if (self.images is None) != (self.image_size is None) or (self.last_images and not self.images):
            raise ConfigError("images: expected images and image_size together (and last_images only with images), "
                              f"found images={self.images} image_size={self.image_size} last_images={self.last_images}")
        if self.max_sequence_length < 1:
            raise ConfigError(f"max_sequence_length must be >= 1, found {self.max_sequence_length}")
        validate_dtype(self.text_dtype, "text_dtype")
        validate_dtype(self.vae_dtype, "vae_dtype")
        if self.fps <= 0:
            raise ConfigError(f"fps must be > 0, found {self.fps}")
        if self.stage2 is not None:
            self.stage2.check_decided()

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with `changes`; stage-2 settings by their own names (cfg.replace(num_inference_steps=2))."""
        stage2 = {name: changes.pop(name) for name in list(changes) if name in STAGE2_KEYS}
        if stage2:
            changes["stage2"] = dataclasses.replace(changes.get("stage2", self.stage2) or Stage2Settings(), **stage2)
        return dataclasses.replace(self, **changes)

    def to_json_dict(self) -> dict[str, Any]:
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "stage2":
                out.update(_stage2_json(self.stage2))
            elif field.name in IMAGE_KEYS:
                if value is not None:
                    out[field.name] = list(value)
            else:
                out[field.name] = value
        out["prompts"] = list(self.prompts)
        return out

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"stage2"}
        missing = [n for n in ("model_id", "prompts", "negative_prompt") if n not in data]
        if missing:
            raise ConfigError(f"generation_config.json: expected keys {missing}, found {sorted(data)}")
        fields = {k: v for k, v in data.items() if k in names}
        stage2 = {k: data[k] for k in STAGE2_KEYS if data.get(k) is not None and k != "attention"}
        if data.get("attention") is not None:
            try:
                stage2["attention"] = AttentionOptions(**{field: data.get(key) for key, field in ATTENTION_KEYS.items()
                                                          if data.get(key) is not None})
            except (AttentionError, TypeError) as err:
                raise ConfigError(f"generation_config.json: expected valid attention settings, found {err}") from None
        lists = ("seeds", "mesh", "expert_steps", "denoising_steps", "loras", "loras_2")
        image_lists = tuple((n, fields) for n in IMAGE_KEYS if fields.get(n) is not None)
        for name, holder in (("prompts", fields), *((n, stage2) for n in lists), *image_lists):
            value = holder.get(name)
            if value is None and name != "prompts":
                continue
            if not isinstance(value, list):
                raise ConfigError(f"generation_config.json: expected {name} to be a list, found "
                                  f"{type(value).__name__} {json_repr(value)}")
            holder[name] = tuple(LoraFile.from_json(v) for v in value) if name.startswith("loras") else tuple(value)
        try:
            return cls(**fields, stage2=Stage2Settings(**stage2) if stage2 else None)
        except TypeError as err:  # a wrongly typed value the dataclass checks could not compare
            raise ConfigError(f"generation_config.json: expected values of the documented types, found {err}"
                              ) from None

    @property
    def do_classifier_free_guidance(self) -> bool:
        # diffusers runs the unconditional branch only when guidance_scale > 1 (at 1 it would cancel out).
        return self.stage2 is not None and self.stage2.guidance_scale > 1.0


IMAGE_KEYS = ("images", "image_sha256", "last_images", "last_image_sha256", "image_size")


def _stage2_json(settings: Stage2Settings | None) -> dict[str, Any]:
    """Stage 2's settings as generation_config.json's flat keys (None: stage 2 has not run, every key null)."""
    out = {}
    for name in STAGE2_KEYS:
        value = None if settings is None else getattr(settings, name)
        if name in OPTIONAL_KEYS and value is None:
            continue
        if name == "attention":  # flat, under the flags' names
            out.update(dict.fromkeys(ATTENTION_KEYS) if value is None else
                       {key: getattr(value, field) for key, field in ATTENTION_KEYS.items()})
        elif name.startswith("loras"):
            out[name] = [lora.to_json() for lora in value]
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out
