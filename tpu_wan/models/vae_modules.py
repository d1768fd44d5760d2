"""Flax NNX modules of the Wan VAE decoders (diffusers' AutoencoderKLWan, decoder half), channels-last: Wan 2.1's
(z16, plain up blocks, RGB out) and Wan 2.2 TI2V-5B's (z48, residual up blocks, 2x2 pixel patches out).

Activations are [V, T, H, W, C] with H, W, C the layer's own resolution and width (latent-sized at the input,
pixels at the output). Parameter paths mirror diffusers' state-dict keys, so `torch_keys` maps them with the few
renames in KEY_RENAMES (a run of same-width residual blocks holds its blocks' weights stacked: `ResidualRun`), and
`to_jax_layout` is the one place torch weight layouts become ours.

Causal caches, as diffusers' `feat_cache` (CACHE_T = 2) but functional. diffusers decodes latent frame 0
alone, then one latent frame per call, and every causal conv with a temporal kernel of 3 keeps the last two
frames of its input from the previous call:
  - call 0 pads time with zeros; it stores x[-2:] (a single frame when the input has one);
  - a later call prepends what was stored (and pads with zeros up to 2 frames if only one was stored), then
    stores the last two frames of [old cache, x] (with >= 2 input frames, just x[-2:]).
Both are exactly "start from a zero cache of 2 frames; each call convolves [cache, x] without temporal
padding and keeps the last 2 frames of [cache, x]", which is what `Chunk.swap` does.
The one exception is the temporal upsampler's `time_conv` (see `Resample`): call 0 skips it (diffusers
marks the slot 'Rep'), and call 1 then runs it with zero padding, i.e. again from a zero cache. Wan 2.2's
residual up blocks follow the same split: their shortcut (`DupUp3D`) drops the frames that time_conv did not
make on call 0 (diffusers' `first_chunk`).

Latent frame 0 runs the code of every other frame (one program, compiled once: XLA:TPU spends tens of seconds on
each 3D convolution): the temporal upsamplers make frames 1.. of its chunk as for any frame, frame 0 stays what
diffusers' first call makes, and `Chunk.first` (a traced bool) picks the first call's caches. Causal convs never
let later frames reach frame 0, so its frames past 0 are computed and dropped (WanVaeDecoder).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpu_wan.core.errors import UserError
from tpu_wan.models.vae_conv import Conv, xla_conv

CACHE_T = 2  # frames of each causal conv's input carried to the next latent frame (diffusers' CACHE_T)
RMS_EPS = 1e-12  # F.normalize's default eps


class Chunk:
    """Per-call state of one decoder pass over one latent frame: the caches read and written in call order
    (diffusers' feat_cache / feat_idx; None: zeros), whether it is latent frame 0 (a bool, traced where frame 0 is a
    trip of the frame loop), and the activation constraint."""

    def __init__(self, caches: Sequence[jax.Array] | None, first, constrain: Callable[[jax.Array], jax.Array],
                 conv: Conv = xla_conv):
        self.old = caches
        self.new: list[jax.Array] = []
        self.first = first
        self.constrain = constrain
        self.conv = conv  # the convolution (tpu_wan.models.vae_conv)

    def take(self, shape: tuple[int, ...], dtype) -> jax.Array:
        """The next cache in call order ([... V CACHE_T H W C]); zeros == diffusers' zero temporal padding."""
        return jnp.zeros(shape, dtype) if self.old is None else self.old[len(self.new)]

    def swap(self, x: jax.Array, *, restart: bool = False) -> jax.Array:
        """The cache for the conv about to read `x` [V T H W C], and records the one for the next latent frame:
        [cache, x]'s last CACHE_T frames, or on frame 0 [cache, x[:, :1]]'s (its only frame of diffusers' first
        call), or zeros (`restart`: a conv that diffusers skips on frame 0)."""
        old = self.take((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
        later = jnp.concatenate([old, x], axis=1)[:, -CACHE_T:]  # [V 2 H W C]
        if restart:
            on_first = jnp.zeros_like(later)
        elif x.shape[1] == 1:
            on_first = later
        else:
            on_first = jnp.concatenate([old, x[:, :1]], axis=1)[:, -CACHE_T:]
        self.new.append(self.constrain(later if on_first is later else jnp.where(self.first, on_first, later)))
        return old


class CausalConv3d(nnx.Module):
    """Conv3d, causal in time (left context from the chunk's cache), 'same' zero padding in H and W.
    A (1, kh, kw) kernel is a per-frame Conv2d and uses no cache."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], *, dtype, precision):
        assert kernel[0] in (1, CACHE_T + 1), f"temporal kernel {kernel[0]}: the cache holds {CACHE_T} frames"
        self.weight = nnx.Param(jnp.zeros((*kernel, cin, cout), dtype))  # [kt kh kw I O]
        self.bias = nnx.Param(jnp.zeros((cout,), dtype))
        self.kernel, self.precision = kernel, precision

    def __call__(self, x: jax.Array, chunk: Chunk, *, restart: bool = False) -> jax.Array:  # [V T H W C] -> [V T H W O]
        if self.kernel[0] > 1:  # 3: the cache holds exactly the kt - 1 frames of left context
            x = jnp.concatenate([chunk.swap(x, restart=restart), x], axis=1)  # [V T+2 H W C]
        return chunk.constrain(chunk.conv(x, self.weight[...], self.bias[...], self.precision))


class RMSNorm(nnx.Module):
    """WanRMS_norm: F.normalize over channels * sqrt(C) * gamma (no bias in the decoder). The normalisation
    runs in float32 (diffusers does the same for bf16 inputs), then casts back."""

    def __init__(self, dim: int, *, dtype):
        self.gamma = nnx.Param(jnp.ones((dim,), dtype))
        self.scale = dim**0.5

    def __call__(self, x: jax.Array) -> jax.Array:  # [... C]
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        normalized = (xf / jnp.maximum(norm, RMS_EPS)).astype(x.dtype)  # F.normalize: x / max(||x||, eps)
        return normalized * self.scale * self.gamma[...]  # same multiplication order as diffusers


class ResidualBlock(nnx.Module):
    """WanResidualBlock: norm -> SiLU -> causal conv, twice, plus a (1x1x1 conv) shortcut. Dropout is 0 at
    inference."""

    def __init__(self, cin: int, cout: int, *, dtype, precision):
        self.norm1 = RMSNorm(cin, dtype=dtype)
        self.conv1 = CausalConv3d(cin, cout, (3, 3, 3), dtype=dtype, precision=precision)
        self.norm2 = RMSNorm(cout, dtype=dtype)
        self.conv2 = CausalConv3d(cout, cout, (3, 3, 3), dtype=dtype, precision=precision)
        shortcut = CausalConv3d(cin, cout, (1, 1, 1), dtype=dtype, precision=precision) if cin != cout else None
        self.conv_shortcut = shortcut

    def __call__(self, x: jax.Array, chunk: Chunk) -> jax.Array:  # [V T H W C] -> [V T H W O]
        h = x if self.conv_shortcut is None else self.conv_shortcut(x, chunk)
        x = self.conv1(jax.nn.silu(self.norm1(x)), chunk)
        x = self.conv2(jax.nn.silu(self.norm2(x)), chunk)
        return x + h


class ResidualRun(nnx.Module):
    """`count` ResidualBlocks of one width in a row, run as one loop over their weights stacked [count, ...]: the
    compiler builds the block's two convolutions once, not once per block. Its caches are one array [count, 2(conv1,
    conv2), V, CACHE_T, H, W, C]; its weights are its blocks' own torch keys (`torch_keys`)."""

    def __init__(self, dim: int, count: int, *, dtype, precision):
        make = lambda: ResidualBlock(dim, dim, dtype=dtype, precision=precision)  # noqa: E731
        self.blocks = nnx.vmap(make, in_axes=None, axis_size=count)()
        self.count = count

    def __call__(self, x: jax.Array, chunk: Chunk) -> jax.Array:  # [V T H W C]
        graphdef, stacked = nnx.split(self.blocks)
        caches = chunk.take((self.count, 2, x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)

        def block(i, carry):
            x, caches = carry
            own = Chunk(caches[i], chunk.first, chunk.constrain, chunk.conv)
            x = nnx.merge(graphdef, jax.tree.map(lambda w: w[i], stacked))(x, own)
            return x, chunk.constrain(caches.at[i].set(jnp.stack(own.new)))

        x, caches = jax.lax.fori_loop(0, self.count, block, (x, caches))
        chunk.new.append(chunk.constrain(caches))
        return x


def residual_blocks(cin: int, cout: int, count: int, **kw) -> nnx.List:
    """`count` ResidualBlocks from `cin` to `cout` channels: a first one that changes the width, then one run of the
    rest. The run sits at list index = its first block's torch index."""
    changes = [ResidualBlock(cin, cout, **kw)] if cin != cout else []
    return nnx.List([*changes, ResidualRun(cout, count - len(changes), **kw)])


class AttentionBlock(nnx.Module):
    """WanAttentionBlock: single-head self-attention over the H*W positions of each frame separately."""

    def __init__(self, dim: int, *, dtype, precision):
        self.norm = RMSNorm(dim, dtype=dtype)
        self.to_qkv = nnx.Param(jnp.zeros((dim, 3 * dim), dtype))  # 1x1 Conv2d as [I O]
        self.to_qkv_bias = nnx.Param(jnp.zeros((3 * dim,), dtype))
        self.proj = nnx.Param(jnp.zeros((dim, dim), dtype))
        self.proj_bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:  # [V T H W C]
        n, t, h, w, c = x.shape
        qkv = jnp.dot(self.norm(x), self.to_qkv[...], precision=self.precision) + self.to_qkv_bias[...]
        q, k, v = jnp.split(qkv.reshape(n * t, h * w, 3 * c), 3, axis=-1)  # 3x [NT L C], L = H*W
        logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=self.precision, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits / math.sqrt(c), axis=-1).astype(x.dtype)  # SDPA's default scale 1/sqrt(C)
        out = jnp.einsum("bqk,bkc->bqc", probs, v, precision=self.precision).reshape(n, t, h, w, c)
        return jnp.dot(out, self.proj[...], precision=self.precision) + self.proj_bias[...] + x


class Resample(nnx.Module):
    """WanResample for the decoder: 'upsample2d' (per frame nearest x2 + 3x3 conv to `cout` channels, by default
    dim // 2) and 'upsample3d' (time_conv makes 2 frames of every frame first, except on the first chunk)."""

    def __init__(self, dim: int, mode: str, cout: int | None = None, *, dtype, precision):
        cout = dim // 2 if cout is None else cout  # diffusers' upsample_out_dim
        self.resample = CausalConv3d(dim, cout, (1, 3, 3), dtype=dtype, precision=precision)  # torch resample.1
        self.time_conv = (
            CausalConv3d(dim, 2 * dim, (3, 1, 1), dtype=dtype, precision=precision) if mode == "upsample3d" else None
        )

    def __call__(self, x: jax.Array, chunk: Chunk) -> jax.Array:  # [V T H W C] -> [V T' 2H 2W O]
        if self.time_conv is not None:
            n, t, h, w, c = x.shape
            # diffusers' 'Rep': frame 0 skips time_conv (one video frame; the next frame's time_conv starts from zero
            # padding, so its cache restarts at zeros); every later frame makes 2 frames of each.
            y = self.time_conv(x, chunk, restart=True).reshape(n, t, h, w, 2, c)  # torch splits 2C as (2, C)
            doubled = y.transpose(0, 1, 4, 2, 3, 5).reshape(n, 2 * t, h, w, c)  # frames interleaved: t0a t0b t1a ...
            x = jnp.where(chunk.first, jnp.repeat(x, 2, axis=1), doubled)  # frame 0: x's own frame 0
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact at scale 2 == pixel repeat
        return self.resample(chunk.constrain(x), chunk)


class MidBlock(nnx.Module):
    """WanMidBlock: residual, attention, residual."""

    def __init__(self, dim: int, *, dtype, precision):
        self.resnets = nnx.List([ResidualBlock(dim, dim, dtype=dtype, precision=precision) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, dtype=dtype, precision=precision)])

    def __call__(self, x: jax.Array, chunk: Chunk) -> jax.Array:
        x = self.resnets[0](x, chunk)
        return self.resnets[1](self.attentions[0](x), chunk)


class UpBlock(nnx.Module):
    """WanUpBlock: num_res_blocks + 1 residual blocks, then an optional upsampler."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, mode: str | None, *, dtype, precision):
        self.resnets = residual_blocks(cin, cout, num_res_blocks + 1, dtype=dtype, precision=precision)
        self.upsamplers = nnx.List([Resample(cout, mode, dtype=dtype, precision=precision)] if mode else [])

    def __call__(self, x: jax.Array, chunk: Chunk) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, chunk)
        for upsampler in self.upsamplers:
            x = upsampler(x, chunk)
        return x


class DupUp3D(nnx.Module):
    """DupUp3D, the parameter-free shortcut of a residual up block: each input channel repeated, the copies laid
    out as ft frames x fs x fs pixels of `cout` channels. On latent frame 0 diffusers keeps the last of the frame's
    ft copies only, as the upsampler's skipped time_conv makes one frame there: here it becomes frame 0."""

    def __init__(self, cin: int, cout: int, ft: int, fs: int):
        assert cout * ft * fs * fs % cin == 0, f"{cin=} must divide {cout=} x {ft=} x {fs=}^2"
        self.cout, self.ft, self.fs, self.repeats = cout, ft, fs, cout * ft * fs * fs // cin

    def __call__(self, x: jax.Array, chunk: Chunk) -> jax.Array:  # [V T H W C] -> [V ft*T fs*H fs*W O]
        n, t, h, w, _ = x.shape
        # The constraint keeps the split of the upsampled sum from propagating back onto x, where it need not
        # divide (H = 2 over 4 devices): without it, Shardy (jax's partitioner) made the layers before it come out
        # wrong inside the scan (max error 5e-2 on 2x3 latents on a 1x4 mesh).
        x = chunk.constrain(jnp.repeat(x, self.repeats, axis=-1))  # [V T H W O*ft*fs*fs]
        # torch's channel c*R + r is (o, ft, fs_h, fs_w); to [V T ft H fs_h W fs_w O]
        x = x.reshape(n, t, h, w, self.cout, self.ft, self.fs, self.fs).transpose(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(n, t * self.ft, h * self.fs, w * self.fs, self.cout)
        return jnp.where(chunk.first, jnp.roll(x, 1 - self.ft, axis=1), x) if self.ft > 1 else x


class ResidualUpBlock(nnx.Module):
    """WanResidualUpBlock (Wan 2.2): num_res_blocks + 1 residual blocks and an upsampler that keeps the width,
    plus a DupUp3D shortcut from the block's input to its output (both only where the block upsamples)."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, mode: str | None, *, dtype, precision):
        self.resnets = residual_blocks(cin, cout, num_res_blocks + 1, dtype=dtype, precision=precision)
        self.upsampler = Resample(cout, mode, cout, dtype=dtype, precision=precision) if mode else None
        self.avg_shortcut = DupUp3D(cin, cout, 2 if mode == "upsample3d" else 1, 2) if mode else None

    def __call__(self, x: jax.Array, chunk: Chunk) -> jax.Array:
        shortcut = x
        for resnet in self.resnets:
            x = resnet(x, chunk)
        if self.upsampler is not None:
            x = chunk.constrain(self.upsampler(x, chunk) + self.avg_shortcut(shortcut, chunk))
        return x


class Decoder3d(nnx.Module):
    """WanDecoder3d: plain up blocks (Wan 2.1, each upsampler halves the width) or residual ones (Wan 2.2)."""

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temperal_upsample, out_channels, is_residual, *, dtype,
                 precision):
        kw = dict(dtype=dtype, precision=precision)
        dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
        self.conv_in = CausalConv3d(z_dim, dims[0], (3, 3, 3), **kw)
        self.mid_block = MidBlock(dims[0], **kw)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            mode = None if i == len(dim_mult) - 1 else "upsample3d" if temperal_upsample[i] else "upsample2d"
            if is_residual:
                blocks.append(ResidualUpBlock(cin, cout, num_res_blocks, mode, **kw))
            else:
                cin = cin // 2 if i > 0 else cin  # the previous block's upsampler halved the channels
                blocks.append(UpBlock(cin, cout, num_res_blocks, mode, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], dtype=dtype)
        self.conv_out = CausalConv3d(dims[-1], out_channels, (3, 3, 3), **kw)

    def __call__(self, x: jax.Array, chunk: Chunk) -> jax.Array:  # [V 1 H W C] -> [V T 8H 8W O]
        x = self.mid_block(self.conv_in(x, chunk), chunk)
        for block in self.up_blocks:
            x = block(x, chunk)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), chunk)


def unpatchify(x: jax.Array, p: int) -> jax.Array:  # [V T H W C*p*p] -> [V T p*H p*W C]
    """diffusers' unpatchify: torch's channel c*p*p + q*p + r is pixel (r, q) of channel c (q along W)."""
    n, t, h, w, c = x.shape
    x = x.reshape(n, t, h, w, c // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)  # [V T H r W q C]
    return x.reshape(n, t, h * p, w * p, c // (p * p))


def pixel_patch(config, key: str) -> int:
    """The VAE's pixel patch (diffusers patchifies where patch_size is not None; 1 is a no-op), checked against the
    RGB channels `key` (in_channels or out_channels) carries: 3 per pixel of a patch."""
    patch = config.get("patch_size") or 1
    channels = config.get(key, 3)
    if channels != 3 * patch**2:
        raise UserError(f"vae config: expected {key} = 3 x patch_size^2 = {3 * patch**2} (RGB pixels), found "
                        f"{key}={channels} patch_size={config.get('patch_size')}")
    return patch


def precision_for(dtype):
    """float32 asks for full-precision matmuls (TPUs otherwise use bf16 passes for f32 convs)."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


class WanVaeDecoder(nnx.Module):
    """post_quant_conv + decoder (+ unpatchify): one latent chunk and its caches -> RGB video frames in [-1, 1]
    and new caches."""

    def __init__(self, config, dtype=jnp.float32):
        self.patch = pixel_patch(config, "out_channels")
        out_channels = config.get("out_channels", 3)
        precision = precision_for(dtype)
        z = config["z_dim"]
        self.post_quant_conv = CausalConv3d(z, z, (1, 1, 1), dtype=dtype, precision=precision)
        self.decoder = Decoder3d(
            config.get("decoder_base_dim") or config["base_dim"], z, config["dim_mult"], config["num_res_blocks"],
            config["temperal_downsample"][::-1], out_channels, bool(config.get("is_residual")), dtype=dtype,
            precision=precision,
        )

    def __call__(self, z, caches, *, first, constrain=lambda x: x, conv: Conv = xla_conv):
        """[V 1 H W C] -> [V T sH sW 3], s: 8 x patch_size (8 for Wan 2.1, 16 for Wan 2.2); T = 4 frames (two temporal
        upsamplers), of which latent frame 0 (`first`) makes only frame 0. caches None: zeros, the caches before
        frame 0. conv: the convolution (tpu_wan.models.vae_conv)."""
        chunk = Chunk(caches, first, constrain, conv)
        x = self.decoder(self.post_quant_conv(z, chunk), chunk)  # [V T 8H 8W 3pp]
        if self.patch > 1:
            x = constrain(unpatchify(x, self.patch))  # [V T 8pH 8pW 3]
        return jnp.clip(x, -1.0, 1.0), tuple(chunk.new)  # diffusers clamps the decoder output to [-1, 1]


# Our parameter path -> diffusers key: joined with '.', plus these renames (regex, replacement).
KEY_RENAMES = (
    (r"\.resample\.", ".resample.1."),  # nn.Sequential(WanUpsample, Conv2d): the conv is item 1
    (r"\.(to_qkv|proj)_bias$", r".\1.bias"),
    (r"\.(to_qkv|proj)$", r".\1.weight"),
)


def torch_keys(path: tuple, shape: tuple[int, ...]) -> list[str]:
    """The diffusers state-dict keys of the parameter at `path` in WanVaeDecoder, of shape `shape`: one, or for a
    ResidualRun's weight [count, ...] its blocks' keys in order (the run at resnets index k holds blocks k, k+1,
    ...)."""
    key = ".".join(str(p) for p in path)
    for pattern, repl in KEY_RENAMES:
        key = re.sub(pattern, repl, key)
    run = re.fullmatch(r"(.*\.resnets\.)(\d+)\.blocks\.(.*)", key)
    if run is None:
        return [key]
    head, start, tail = run.groups()
    return [f"{head}{int(start) + i}.{tail}" for i in range(shape[0])]


def to_jax_layout(tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A diffusers tensor in our layout: conv weights [O, I, *k] -> [*k, I, O] (Conv3d [O I T H W] ->
    [T H W I O], Conv2d [O I H W] -> [H W I O]), then reshaped to `shape`, which only adds or drops unit dims
    (Conv2d -> a (1, kh, kw) kernel, 1x1 Conv2d -> a matrix, gamma [C 1 1 (1)] -> [C])."""
    if tensor.ndim >= 4:
        tensor = np.transpose(tensor, (*range(2, tensor.ndim), 1, 0))
    squeezed = [d for d in tensor.shape if d != 1]
    if squeezed != [d for d in shape if d != 1]:
        raise ValueError(f"weight layout: expected a tensor reshapeable to {shape}, found {tensor.shape}")
    return tensor.reshape(shape)
