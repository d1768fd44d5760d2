"""Stage 3: Wan VAE decode, normalised latents [V, C, F, H, W] -> frames [V, T, sH, sW, 3] in [0, 1].

s is the VAE's spatial compression: 8 for the Wan 2.1 VAE (C = 16), 16 for Wan 2.2 TI2V-5B's (C = 48; its
decoder upsamples 8x to 2x2-pixel patches). A native Flax NNX port of diffusers' AutoencoderKLWan decoder, both
kinds (modules in tpu_wan/models/vae_modules.py), loading its weights straight from
`vae/diffusion_pytorch_model.safetensors` (only decoder.* and post_quant_conv.*; the encoder weights in that file
are not read). De-normalisation and post-processing follow diffusers' WanPipeline op for op (latents / (1 / std)
+ mean, decode, unpatchify for Wan 2.2, clamp to [-1, 1], x * 0.5 + 0.5 clamped to [0, 1]), so float32 frames
match diffusers to float32 rounding.

T = 4 (F - 1) + 1: one program, a `lax.scan` over the latent frames whose carry is the causal caches (last two
input frames of every temporal conv), four frames per trip, of which latent frame 0 (the first trip) keeps one.
The decoder is compiled once, for all frames and whatever their count; inside it each run of same-width residual
blocks is a loop too (vae_modules.ResidualRun). XLA:TPU spends tens of seconds of compile time on every 3D
convolution of a program, whatever its size, so the count of convolutions in the program is its compile time.
"""

from __future__ import annotations

import logging
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
from tpu_wan.models import vae_conv
from tpu_wan.models.vae_modules import WanVaeDecoder, to_jax_layout, torch_keys
from tpu_wan.runtime import distributed, profiling, programs
from tpu_wan.runtime import mesh as mesh_lib

log = logging.getLogger("tpu_wan")
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
DECODER_PREFIXES = ("decoder.", "post_quant_conv.")  # stage 3 reads these keys only
ENCODER_PREFIXES = ("encoder.", "quant_conv.")  # stage 1 (image to video) these


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


def decoder_keys(weights_file: Path, prefixes: tuple[str, ...] = DECODER_PREFIXES) -> list[str]:
    """The keys of a diffusers VAE weights file that start with `prefixes` (default: the decoder's)."""
    from safetensors import safe_open

    with safe_open(weights_file, framework="numpy") as f:
        return sorted(k for k in f.keys() if k.startswith(prefixes))


def _first(keys: set, shown: int = 5) -> str:
    """The first `shown` of sorted `keys`, and how many more."""
    names = sorted(keys)
    return str(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def describe(config) -> str:
    """The kind of VAE a config builds, in words, for error messages."""
    family = "Wan 2.2" if config.get("is_residual") else "Wan 2.1"
    return (f"a {family} AutoencoderKLWan (z_dim={config.get('z_dim')}, is_residual={config.get('is_residual')}, "
            f"patch_size={config.get('patch_size')})")


def load_params(abstract: nnx.State, weights_file: Path, dtype, sharding, kind: str = "an AutoencoderKLWan",
                prefixes: tuple[str, ...] = DECODER_PREFIXES) -> nnx.State:
    """Fills every parameter of `abstract` from the weights file, each torch key used exactly once; refuses a
    missing, unused or misshapen weight among the keys starting with `prefixes` (the decoder's or the encoder's).
    `kind`: what the config says the file holds (`describe`)."""
    from safetensors import safe_open

    flat = nnx.to_flat_state(abstract)
    wanted = {path: torch_keys(path, var.shape) for path, var in flat}
    keys = [key for path_keys in wanted.values() for key in path_keys]
    if len(set(keys)) != len(keys):
        raise AssertionError("vae: two parameters map to the same torch key")  # a bug in KEY_RENAMES
    present = set(decoder_keys(weights_file, prefixes))
    if present != set(keys):
        part = prefixes[0].rstrip(".")
        raise UserError(
            f"vae weights {weights_file}: expected keys missing {_first(set(keys) - present)}, "
            f"unused {part} keys {_first(present - set(keys))} (is this {kind}?)"
        )
    filled = []
    with safe_open(weights_file, framework="numpy") as f:
        for path, var in flat:
            path_keys = wanted[path]
            shape = var.shape if len(path_keys) == 1 else var.shape[1:]  # a ResidualRun's: one row per block
            try:
                rows = [to_jax_layout(f.get_tensor(key), shape).astype(dtype) for key in path_keys]
            except ValueError as err:
                raise UserError(f"vae weights {weights_file}: {path_keys[0]}: {err}") from None
            value = rows[0] if len(path_keys) == 1 else np.stack(rows)
            filled.append((path, var.replace(jax.device_put(value, sharding))))
    return nnx.from_flat_state(filled)


# Rows (or columns) of the latents each device holds where H (or W) is split, at least: with one, the 3x3 convs'
# halo is a whole shard, and jax's default partitioner (Shardy) decoded such splits wrong (latents 2x3, H over tp on
# a 2x2 or 4x2 mesh: 8.9e-2 and 1.5e-1 from the unsharded decode; GSPMD 7e-7); with two, latents 2x3 to 8x3 on
# 2x2, 1x4, 2x4, 4x1 and 4x2 meshes all decode within 9e-7 of it (tests/test_vae.py).
MIN_SHARD = 2


def activation_sharding(mesh, shape: tuple[int, ...], grid: tuple[int, int] | None = None) -> NamedSharding:
    """[... V T H W C] activations (leading axes, such as a residual run's stacked caches, unsplit): V over dp where
    it divides, W over the remaining mesh axes (all of them, or tp alone) where the latent width divides, else H where
    the latent height does; replicated otherwise. The partitioner adds the conv halo exchanges (vae_conv's Pallas
    convolution its own).

    `grid`: the latents' (H, W), which decides the layout of every layer of one decode (default: `shape`'s own). The
    decoder only upsamples, so each layer's H and W are multiples of the latents' and one layout serves them all,
    with no resharding between layers (the trained sizes' latent widths, 104, 160 and 80, split over 8 chips at the
    latent resolution already). A split gives every device at least MIN_SHARD latent rows or columns."""
    lead = (None,) * (len(shape) - 5)
    n, _, h, w, _ = shape[-5:]
    h, w = grid or (h, w)
    batch = "dp" if mesh.shape["dp"] > 1 and n % mesh.shape["dp"] == 0 else None
    for axes in [("tp",)] if batch else [("dp", "tp"), ("tp",)]:
        size = int(np.prod([mesh.shape[a] for a in axes]))
        if size == 1:
            continue
        if w % size == 0 and w // size >= MIN_SHARD:
            return NamedSharding(mesh, P(*lead, batch, None, None, axes, None))
        if h % size == 0 and h // size >= MIN_SHARD:
            return NamedSharding(mesh, P(*lead, batch, None, axes, None, None))
    return NamedSharding(mesh, P(*lead, batch))


def layer_constraint(mesh, grid: tuple[int, int]) -> Callable[[jax.Array], jax.Array]:
    """The sharding constraint of every layer of a VAE pass over latents of `grid` (H, W): activation_sharding."""
    return lambda x: jax.lax.with_sharding_constraint(x, activation_sharding(mesh, x.shape, grid))


def layer_conv(mesh, conv: str, grid: tuple[int, int]) -> vae_conv.Conv:
    """The convolution (`conv`: a resolved vae_conv.CONVS setting) of every layer of a VAE pass over latents of
    `grid`, for the activations' layout; the Pallas kernel runs interpreted off TPU."""
    if conv == "xla":
        return vae_conv.xla_conv
    interpret = mesh.devices.flat[0].platform != "tpu"
    return lambda x, *args: vae_conv.pallas_conv(  # noqa: E731
        mesh, activation_sharding(mesh, x.shape, grid).spec, interpret=interpret)(x, *args)


class VaeHalf:
    """One half of AutoencoderKLWan (`module`: the decoder's or the encoder's NNX module, reading the weights under
    `prefixes`) loaded once onto a mesh: weights replicated, activations split over it (activation_sharding)."""

    def __init__(self, model_path: Path, mesh, dtype: str, *, module, prefixes: tuple[str, ...],
                 abstract: bool = False, conv: str = "auto"):
        """`abstract`: no weights read, only their shapes and shardings, to compile for a slice that is not attached
        (tpu_wan.run.aot). `conv`: the convolutions' implementation, vae_conv.CONVS or auto (the Pallas kernel on
        TPU chips, XLA's elsewhere; on CPU the kernel runs interpreted, for tests)."""
        if dtype not in DTYPES:
            raise UserError(f"vae dtype: expected one of {list(DTYPES)}, found {dtype!r}")
        if conv not in ("auto", *vae_conv.CONVS):
            raise UserError(f"vae conv: expected one of {['auto', *vae_conv.CONVS]}, found {conv!r}")
        self.conv = vae_conv.resolve(conv, mesh)
        vae_path = Path(model_path) / "vae"
        self.config = load_config(vae_path)
        self.mesh = mesh
        self.dtype = getattr(jnp, dtype)  # jnp.float32 or jnp.bfloat16
        model = nnx.eval_shape(lambda: module(self.config, self.dtype))  # shapes only, no init
        self._graphdef, state = nnx.split(model)
        replicated = NamedSharding(mesh, P())
        if abstract:
            self.params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated), state)
        else:
            self.params = load_params(state, vae_path / WEIGHTS_FILE, self.dtype, replicated, describe(self.config),
                                      prefixes)
        self.programs = {}  # what ran, for profiling.temp_bytes
        self.compile_s: dict[str, float] = {}  # program -> seconds jax spent compiling it (profiling.compiling)
        self._probed: set = set()  # input shapes whose pass was traced with the kernel (settle_conv)
        self._xla_shapes: set = set()  # ... and of those, where some layer has no kernel block that fits

    def conv_for(self, shape: tuple[int, ...]) -> str:
        """The convolution a pass over an input of `shape` runs: `conv`, but XLA's for every layer where some layer
        has no kernel block that fits (settle_conv): a lone XLA convolution beside the Pallas calls takes on their
        layouts and compiles for minutes (Wan 2.2's encoder at TI2V-5B's size on one v6e chip: 320- and 640-channel
        layers, over 15 minutes before it was stopped)."""
        return "xla" if tuple(shape) in self._xla_shapes else self.conv

    def settle_conv(self, fn, *args) -> None:
        """Decides conv_for(args[-1].shape) by tracing `fn(*args)` (abstract) once with the kernel."""
        shape = tuple(args[-1].shape)
        if self.conv != "pallas" or shape in self._probed:
            return
        with vae_conv.recording_fallbacks([]) as fell_back:
            jax.eval_shape(fn, *args)
        self._probed.add(shape)
        if fell_back:
            self._xla_shapes.add(shape)
            log.info("vae: %d convolution(s) of a pass over %s fit no kernel block (first: input %s): XLA's "
                     "convolutions for all of its layers", len(fell_back), shape, fell_back[0])


class VaeDecoder(VaeHalf):
    """AutoencoderKLWan's decoder on a mesh (VaeHalf)."""

    def __init__(self, model_path: Path, mesh, dtype: str = "float32", *, abstract: bool = False, conv: str = "auto"):
        super().__init__(model_path, mesh, dtype, module=WanVaeDecoder, prefixes=DECODER_PREFIXES, abstract=abstract,
                         conv=conv)
        self._mean = np.asarray(self.config.latents_mean, np.float32).reshape(1, -1, 1, 1, 1)
        # WanPipeline divides by 1 / std (not multiplies by std); the same here, for bit-faithfulness.
        self._inv_std = 1.0 / np.asarray(self.config.latents_std, np.float32).reshape(1, -1, 1, 1, 1)
        self._decode = jax.jit(self._decode_frames)  # one program per latents shape

    def _layout(self, latents_shape: tuple[int, ...]) -> Callable[[jax.Array], jax.Array]:
        """The activation constraint of every layer of a decode of latents [V C F H W] (activation_sharding's one
        layout, decided by the latents' H and W)."""
        return layer_constraint(self.mesh, tuple(latents_shape[-2:]))

    def _conv(self, latents_shape: tuple[int, ...]) -> vae_conv.Conv:
        """The convolution of every layer of a decode of latents [V C F H W], for the activations' layout."""
        return layer_conv(self.mesh, self.conv_for(latents_shape), tuple(latents_shape[-2:]))

    def _latents(self, latents: jax.Array, constrain) -> jax.Array:  # [V C F H W] normalised -> [V F H W C]
        z = latents / self._inv_std + self._mean  # float32, diffusers' de-normalisation
        return constrain(z.transpose(0, 2, 3, 4, 1).astype(self.dtype))

    def _decode_frames(self, params: nnx.State, latents: jax.Array) -> jax.Array:
        """Frames [V 3 T Hp Wp] in [0, 1], channels first, for normalised latents [V C F H W]: latent frame f as trip f
        of a scan whose carry is the causal caches (from zeros) and the video, each trip writing its frames in place.
        Channels first, and written in place rather than stacked by the scan: the TPU's (8, 128) tiling pads a minor
        axis of 3 RGB channels to 128 lanes, and a stacked output took the decoder's last layout (4 GiB at 480p x 81
        on 4 chips against 0.1); `decode` puts the channels last on the host."""
        model = nnx.merge(self._graphdef, params)
        constrain, conv = self._layout(latents.shape), self._conv(latents.shape)
        z = self._latents(latents, constrain).swapaxes(0, 1)[:, :, None]  # [F V 1 H W C]

        def decode(caches, z_f, first):
            return model(z_f, caches, first=first, constrain=constrain, conv=conv)

        _, before_first = jax.eval_shape(decode, None, z[0], True)  # caches None: zeros, the caches shapes
        caches = jax.tree.map(lambda c: constrain(jnp.zeros(c.shape, c.dtype)), before_first)

        # Trip f's 4 frames are video frames 4f - 3 .. 4f; trip 0's are frame 0 and 3 the next trip overwrites.
        z0, _ = jax.eval_shape(decode, None, z[0], True)
        n, per_trip, *frame, c = z0.shape
        f = z.shape[0]
        video = jnp.zeros((n, c, max(per_trip * (f - 1) + 1, per_trip), *frame), jnp.float32)

        def step(carry, xs):
            caches, video, f = carry
            frames, caches = decode(caches, *xs)
            start = jnp.maximum(per_trip * f - (per_trip - 1), 0)
            frames = jnp.moveaxis(frames, -1, 1).astype(jnp.float32)  # [V 3 4 Hp Wp]
            video = jax.lax.dynamic_update_slice_in_dim(video, frames, start, 2)
            return (caches, video, f + 1), None

        (_, video, _), _ = jax.lax.scan(step, (caches, video, 0), (z, jnp.arange(f) == 0))
        video = video[:, :, :per_trip * (f - 1) + 1]  # [V 3 T Hp Wp]
        return jnp.clip(video * 0.5 + 0.5, 0.0, 1.0)  # WanPipeline's postprocess

    def compile_seconds(self, latents_shape: tuple[int, ...]) -> float:
        """Seconds to lower and compile the decode program for float32 latents of `latents_shape`."""
        start = time.perf_counter()
        self.settle_conv(self._decode_frames, self.params, self._abstract_latents(latents_shape))
        self._decode.lower(self.params, self._abstract_latents(latents_shape)).compile()
        return time.perf_counter() - start

    def programs_for(self, latents_shape: tuple[int, ...], *, uint8: bool) -> dict:
        """name -> (jitted, abstract arguments) of each program `decode` runs for latents [V C F H W] (with
        `uint8`, the on-device conversion too), as remember_program records them."""
        latents = self._abstract_latents(latents_shape)
        self.settle_conv(self._decode_frames, self.params, latents)
        programs = {"decode": (self._decode, (self.params, latents))}
        if uint8:
            frames = self._decode.eval_shape(self.params, latents)  # [V 3 T Hp Wp], split as its layers' W (or H)
            v, c, t, h, w = frames.shape
            spec = activation_sharding(self.mesh, (v, t, h, w, c), tuple(latents_shape[-2:])).spec
            spec = P(*spec, *([None] * (5 - len(spec))))
            placed = NamedSharding(self.mesh, P(spec[0], spec[4], spec[1], spec[2], spec[3]))
            programs["to_uint8"] = (_to_uint8, (jax.ShapeDtypeStruct(frames.shape, frames.dtype, sharding=placed),))
        return programs

    def _abstract_latents(self, shape) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._input_sharding(shape))

    def _input_sharding(self, shape) -> NamedSharding:
        return mesh_lib.batch_sharding(self.mesh, shape[0], len(shape))

    def decode(self, latents: np.ndarray, *, uint8: bool = False) -> np.ndarray:
        """float32 frames [V, T, Hp, Wp, 3] in [0, 1] for normalised latents [V, C, F, H, W]; with `uint8`, the
        frames converted on device (a quarter of the bytes to transfer) exactly as video.to_uint8 does."""
        latents = np.asarray(latents, np.float32)
        if latents.ndim != 5 or latents.shape[1] != self.config.z_dim:
            raise UserError(f"vae latents: expected [V, {self.config.z_dim}, F, H, W], found {list(latents.shape)}")
        latents = jax.device_put(latents, self._input_sharding(latents.shape))
        self.settle_conv(self._decode_frames, self.params, latents)
        conv = self.conv_for(latents.shape)
        with profiling.compiling(self.compile_s, "decode"):
            frames = programs.call("decode", self._decode, self.params, latents, model=self.config, conv=conv)
        profiling.remember_program(self.programs, "decode", self._decode, self.params, latents)
        if uint8:
            with profiling.compiling(self.compile_s, "to_uint8"):
                frames = programs.call("to_uint8", _to_uint8, frames, model=self.config, conv=conv)
        return np.moveaxis(distributed.to_host(frames), 1, -1)  # [V T Hp Wp 3]


@jax.jit
def _to_uint8(frames: jax.Array) -> jax.Array:
    # diffusers' export_to_video: (frame * 255).astype(uint8) in float32, i.e. truncation; frames are in [0, 1].
    return (frames * 255).astype(jnp.uint8)
