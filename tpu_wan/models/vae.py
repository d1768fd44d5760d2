"""Stage 3: Wan VAE decode, normalised latents [V, C, F, H, W] -> frames [V, T, sH, sW, 3] in [0, 1].

s is the VAE's spatial compression: 8 for the Wan 2.1 VAE (C = 16), 16 for Wan 2.2 TI2V-5B's (C = 48; its
decoder upsamples 8x to 2x2-pixel patches). A native Flax NNX port of diffusers' AutoencoderKLWan decoder, both
kinds (modules in tpu_wan/models/vae_modules.py), loading its weights straight from
`vae/diffusion_pytorch_model.safetensors` (only decoder.* and post_quant_conv.*; the encoder weights in that file
are not read). De-normalisation and post-processing follow diffusers' WanPipeline op for op (latents / (1 / std)
+ mean, decode, unpatchify for Wan 2.2, clamp to [-1, 1], x * 0.5 + 0.5 clamped to [0, 1]), so float32 frames
match diffusers to float32 rounding.

T = 4 (F - 1) + 1: latent frame 0 decodes alone to one frame; the other latent frames run in a `lax.scan`
whose carry is the causal caches (last two input frames of every temporal conv), four frames per step. The
scan body is compiled once, so compile time does not grow with the frame count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tpu_wan.core.config import DTYPES
from tpu_wan.core.errors import UserError
from tpu_wan.models.vae_modules import WanVaeDecoder, to_jax_layout, torch_key
from tpu_wan.runtime import distributed, profiling, programs
from tpu_wan.runtime import mesh as mesh_lib

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
DECODER_PREFIXES = ("decoder.", "post_quant_conv.")  # all other keys (encoder.*, quant_conv.*) stay unread


# AutoencoderKLWan's constructor defaults (diffusers 0.42.1; latents_mean/std are Wan 2.1's statistics), for the
# keys a config.json leaves out. Reading them from diffusers would import torch and diffusers (~3 s of a stage-3
# process start) into a stage that runs neither; tests/test_vae.py checks this table and load_config against
# diffusers' own signature and extract_init_dict.
AUTOENCODER_DEFAULTS = dict(
    base_dim=96, decoder_base_dim=None, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                  -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                 1.6382, 1.1253, 2.8251, 1.916],
    is_residual=False, in_channels=3, out_channels=3, patch_size=None, scale_factor_temporal=4, scale_factor_spatial=8,
)


class VaeConfig(dict):
    """A VAE's constructor arguments, read-only, with attribute access (as diffusers' FrozenDict)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key, value):
        raise TypeError("VaeConfig is read-only")


def load_config(vae_path: Path) -> VaeConfig:
    """diffusers' AutoencoderKLWan config as its constructor sees it: config.json's keys that the constructor takes
    (the file's others, such as `_class_name` or a dropped `clip_output`, are ignored, as diffusers ignores them)
    over AUTOENCODER_DEFAULTS."""
    from tpu_wan.models import checkpoints

    vae_path = Path(vae_path)
    given = checkpoints.read_config(vae_path.parent, vae_path.name)
    return VaeConfig({key: given.get(key, default) for key, default in AUTOENCODER_DEFAULTS.items()})


def decoder_keys(weights_file: Path) -> list[str]:
    """The decoder.* and post_quant_conv.* keys of a diffusers VAE weights file."""
    from safetensors import safe_open

    with safe_open(weights_file, framework="numpy") as f:
        return sorted(k for k in f.keys() if k.startswith(DECODER_PREFIXES))


def _first(keys: set, shown: int = 5) -> str:
    """The first `shown` of sorted `keys`, and how many more."""
    names = sorted(keys)
    return str(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def describe(config) -> str:
    """The kind of VAE a config builds, in words, for error messages."""
    family = "Wan 2.2" if config.get("is_residual") else "Wan 2.1"
    return (f"a {family} AutoencoderKLWan (z_dim={config.get('z_dim')}, is_residual={config.get('is_residual')}, "
            f"patch_size={config.get('patch_size')})")


def load_params(abstract: nnx.State, weights_file: Path, dtype, sharding,
                kind: str = "an AutoencoderKLWan") -> nnx.State:
    """Fills every parameter of `abstract` from the weights file, each torch key used exactly once; refuses a
    missing, unused or misshapen weight. `kind`: what the config says the file holds (`describe`)."""
    from safetensors import safe_open

    flat = nnx.to_flat_state(abstract)
    wanted = {torch_key(path): (path, var) for path, var in flat}
    if len(wanted) != len(flat):
        raise AssertionError("vae: two parameters map to the same torch key")  # a bug in KEY_RENAMES
    present = set(decoder_keys(weights_file))
    if present != set(wanted):
        raise UserError(
            f"vae weights {weights_file}: expected keys missing {_first(set(wanted) - present)}, "
            f"unused decoder keys {_first(present - set(wanted))} (is this {kind}?)"
        )
    filled = []
    with safe_open(weights_file, framework="numpy") as f:
        for key, (path, var) in wanted.items():
            try:
                value = to_jax_layout(f.get_tensor(key), var.shape).astype(dtype)
            except ValueError as err:
                raise UserError(f"vae weights {weights_file}: {key}: {err}") from None
            filled.append((path, var.replace(jax.device_put(value, sharding))))
    return nnx.from_flat_state(filled)


# Rows (or columns) of the latents each device holds where H (or W) is split, at least: with one, the 3x3 convs'
# halo is a whole shard, and jax's default partitioner (Shardy) decoded such splits wrong (latents 2x3, H over tp on
# a 2x2 or 4x2 mesh: 8.9e-2 and 1.5e-1 from the unsharded decode; GSPMD 7e-7); with two, latents 2x3 to 8x3 on
# 2x2, 1x4, 2x4, 4x1 and 4x2 meshes all decode within 9e-7 of it (tests/test_vae.py).
MIN_SHARD = 2


def activation_sharding(mesh, shape: tuple[int, ...], grid: tuple[int, int] | None = None) -> NamedSharding:
    """[V T H W C] activations: V over dp where it divides, W over the remaining mesh axes (all of them, or tp
    alone) where the latent width divides, else H where the latent height does; replicated otherwise. The partitioner
    adds the conv halo exchanges.

    `grid`: the latents' (H, W), which decides the layout of every layer of one decode (default: `shape`'s own). The
    decoder only upsamples, so each layer's H and W are multiples of the latents' and one layout serves them all,
    with no resharding between layers (the trained sizes' latent widths, 104, 160 and 80, split over 8 chips at the
    latent resolution already). A split gives every device at least MIN_SHARD latent rows or columns."""
    n, _, h, w, _ = shape
    h, w = grid or (h, w)
    batch = "dp" if mesh.shape["dp"] > 1 and n % mesh.shape["dp"] == 0 else None
    for axes in [("tp",)] if batch else [("dp", "tp"), ("tp",)]:
        size = int(np.prod([mesh.shape[a] for a in axes]))
        if size == 1:
            continue
        if w % size == 0 and w // size >= MIN_SHARD:
            return NamedSharding(mesh, P(batch, None, None, axes, None))
        if h % size == 0 and h // size >= MIN_SHARD:
            return NamedSharding(mesh, P(batch, None, axes, None, None))
    return NamedSharding(mesh, P(batch))


class VaeDecoder:
    """AutoencoderKLWan's decoder loaded once onto a mesh (weights replicated, activations split over it)."""

    def __init__(self, model_path: Path, mesh, dtype: str = "float32", *, abstract: bool = False):
        """`abstract`: no weights read, only their shapes and shardings, to compile the decoder for a slice that
        is not attached (tpu_wan.run.aot)."""
        if dtype not in DTYPES:
            raise UserError(f"vae dtype: expected one of {list(DTYPES)}, found {dtype!r}")
        vae_path = Path(model_path) / "vae"
        self.config = load_config(vae_path)
        self.mesh = mesh
        self.dtype = getattr(jnp, dtype)  # jnp.float32 or jnp.bfloat16
        model = nnx.eval_shape(lambda: WanVaeDecoder(self.config, self.dtype))  # shapes only, no init
        self._graphdef, state = nnx.split(model)
        replicated = NamedSharding(mesh, P())
        if abstract:
            self.params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated), state)
        else:
            self.params = load_params(state, vae_path / WEIGHTS_FILE, self.dtype, replicated, describe(self.config))
        self._mean = np.asarray(self.config.latents_mean, np.float32).reshape(1, -1, 1, 1, 1)
        # WanPipeline divides by 1 / std (not multiplies by std); the same here, for bit-faithfulness.
        self._inv_std = 1.0 / np.asarray(self.config.latents_std, np.float32).reshape(1, -1, 1, 1, 1)
        # Two programs: latent frame 0 (its shapes do not depend on F, so it compiles once per video size) and
        # the scan over the other frames (compiled per F, at a cost that does not grow with F).
        self._first = jax.jit(self._decode_first)
        self._rest = jax.jit(self._decode_rest)
        self.programs = {}  # what ran, for profiling.temp_bytes
        self.compile_s: dict[str, float] = {}  # program -> seconds jax spent compiling it (profiling.compiling)

    def _layout(self, latents_shape: tuple[int, ...]) -> Callable[[jax.Array], jax.Array]:
        """The activation constraint of every layer of a decode of latents [V C F H W] (activation_sharding's one
        layout, decided by the latents' H and W)."""
        grid = tuple(latents_shape[-2:])
        return lambda x: jax.lax.with_sharding_constraint(x, activation_sharding(self.mesh, x.shape, grid))

    def _latents(self, latents: jax.Array, constrain) -> jax.Array:  # [V C F H W] normalised -> [V F H W C]
        z = latents / self._inv_std + self._mean  # float32, diffusers' de-normalisation
        return constrain(z.transpose(0, 2, 3, 4, 1).astype(self.dtype))

    def _decode_first(self, params: nnx.State, latents: jax.Array):  # [V C 1 H W] -> [V 1 Hp Wp 3], caches
        # first=True: the temporal upsamplers skip time_conv and Wan 2.2's shortcuts keep one frame of each
        # frame's copies, so latent frame 0 decodes to one frame (diffusers' 'Rep' and first_chunk).
        model = nnx.merge(self._graphdef, params)
        constrain = self._layout(latents.shape)
        video, caches = model(self._latents(latents, constrain), None, first=True, constrain=constrain)
        return video, caches

    def _decode_rest(self, params: nnx.State, video: jax.Array, caches, latents: jax.Array) -> jax.Array:
        """Frames [V T Hp Wp 3] in [0, 1] from frame 0's video [V 1 Hp Wp 3] and caches, latents [V C F-1 H W]."""
        model = nnx.merge(self._graphdef, params)
        constrain = self._layout(latents.shape)

        def step(caches, z_f):  # z_f [V H W C] -> new caches, [V 4 Hp Wp 3]
            frames, caches = model(z_f[:, None], caches, first=False, constrain=constrain)
            return caches, frames

        if latents.shape[2]:
            _, rest = jax.lax.scan(step, caches, self._latents(latents, constrain).swapaxes(0, 1))  # [F-1 N 4 H W 3]
            n, _, h, w, c = video.shape
            rest = rest.swapaxes(0, 1).reshape(n, -1, h, w, c)  # [V 4(F-1) Hp Wp 3], frames in time order
            video = jnp.concatenate([video, rest], axis=1)  # [V T Hp Wp 3]
        return jnp.clip(video.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)  # WanPipeline's postprocess

    def compile_seconds(self, latents_shape: tuple[int, ...], first: bool = True) -> float:
        """Seconds to lower and compile the decode programs for float32 latents of `latents_shape`: both, or
        with first=False only the scan over latent frames 1.. (frame 0's program does not depend on F)."""
        start = time.perf_counter()
        lowered = self._first.lower(self.params, self._abstract_latents(latents_shape, 1))
        if first:
            lowered.compile()
        else:
            start = time.perf_counter()
        video, caches = lowered.out_info
        rest = self._abstract_latents(latents_shape, latents_shape[2] - 1)
        self._rest.lower(self.params, video, caches, rest).compile()
        return time.perf_counter() - start

    def programs_for(self, latents_shape: tuple[int, ...], *, uint8: bool) -> dict:
        """name -> (jitted, abstract arguments) of each program `decode` runs for latents [V C F H W] (with
        `uint8`, the on-device conversion too), as remember_program records them."""
        # Frame 0's video and caches, and the frames, carry the activation sharding their constraints give them.
        grid = tuple(latents_shape[-2:])
        placed = lambda a: jax.ShapeDtypeStruct(  # noqa: E731
            a.shape, a.dtype, sharding=activation_sharding(self.mesh, a.shape, grid))
        first = self._abstract_latents(latents_shape, 1)
        video, caches = jax.tree.map(placed, self._first.eval_shape(self.params, first))
        rest = self._abstract_latents(latents_shape, latents_shape[2] - 1)
        programs = {"first": (self._first, (self.params, first)),
                    "rest": (self._rest, (self.params, video, caches, rest))}
        if uint8:
            programs["to_uint8"] = (_to_uint8, (placed(self._rest.eval_shape(self.params, video, caches, rest)),))
        return programs

    def _abstract_latents(self, shape, frames: int) -> jax.ShapeDtypeStruct:
        shape = (*shape[:2], frames, *shape[3:])
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._input_sharding(shape))

    def _input_sharding(self, shape) -> NamedSharding:
        return mesh_lib.batch_sharding(self.mesh, shape[0], len(shape))

    def decode(self, latents: np.ndarray, *, uint8: bool = False) -> np.ndarray:
        """float32 frames [V, T, Hp, Wp, 3] in [0, 1] for normalised latents [V, C, F, H, W]; with `uint8`, the
        frames converted on device (a quarter of the bytes to transfer) exactly as video.to_uint8 does."""
        latents = np.asarray(latents, np.float32)
        if latents.ndim != 5 or latents.shape[1] != self.config.z_dim:
            raise UserError(f"vae latents: expected [V, {self.config.z_dim}, F, H, W], found {list(latents.shape)}")
        first, rest = (jax.device_put(x, self._input_sharding(x.shape)) for x in (latents[:, :, :1], latents[:, :, 1:]))
        with profiling.compiling(self.compile_s, "first"):
            video, caches = programs.call("first", self._first, self.params, first, model=self.config)
        with profiling.compiling(self.compile_s, "rest"):
            frames = programs.call("rest", self._rest, self.params, video, caches, rest, model=self.config)
        profiling.remember_program(self.programs, "first", self._first, self.params, first)
        profiling.remember_program(self.programs, "rest", self._rest, self.params, video, caches, rest)
        if uint8:
            with profiling.compiling(self.compile_s, "to_uint8"):
                frames = programs.call("to_uint8", _to_uint8, frames, model=self.config)
        return distributed.to_host(frames)


@jax.jit
def _to_uint8(frames: jax.Array) -> jax.Array:
    # diffusers' export_to_video: (frame * 255).astype(uint8) in float32, i.e. truncation; frames are in [0, 1].
    return (frames * 255).astype(jnp.uint8)
