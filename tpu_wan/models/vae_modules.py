"""Flax NNX modules of the Wan VAE decoders (diffusers' AutoencoderKLWan, decoder half), channels-last: Wan 2.1's
(z16, plain up blocks, RGB out) and Wan 2.2 TI2V-5B's (z48, residual up blocks, 2x2 pixel patches out).

Activations are [V, T, H, W, C] with H, W, C the layer's own resolution and width (latent-sized at the input,
pixels at the output). Parameter paths mirror diffusers' state-dict keys, so `torch_key` maps them with the few
renames in KEY_RENAMES, and `to_jax_layout` is the one place torch weight layouts become ours.

Causal caches, as diffusers' `feat_cache` (CACHE_T = 2) but functional. diffusers decodes latent frame 0
alone, then one latent frame per call, and every causal conv with a temporal kernel of 3 keeps the last two
frames of its input from the previous call:
  - call 0 pads time with zeros; it stores x[-2:] (a single frame when the input has one);
  - a later call prepends what was stored (and pads with zeros up to 2 frames if only one was stored), then
    stores the last two frames of [old cache, x] (with >= 2 input frames, just x[-2:]).
Both are exactly "start from a zero cache of 2 frames; each call convolves [cache, x] without temporal
padding and keeps the last 2 frames of [cache, x]", which is what `Chunk.swap` does. With zeros as the
first cache, every call (the first included) runs the same code and produces caches of the same shapes,
so the caches of frame 0 are the initial carry of a `lax.scan` over the remaining frames.
The one exception is the temporal upsampler's `time_conv` (see `Resample`): call 0 skips it (diffusers
marks the slot 'Rep'), and call 1 then runs it with zero padding, i.e. again from a zero cache. Wan 2.2's
residual up blocks follow the same split: their shortcut (`DupUp3D`) drops the frames that time_conv did not
make on call 0 (diffusers' `first_chunk`), so `Chunk.first` decides both.
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

CACHE_T = 2  # frames of each causal conv's input carried to the next latent frame (diffusers' CACHE_T)
RMS_EPS = 1e-12  # F.normalize's default eps


class Chunk:
    """Per-call state of one decoder pass over a chunk of latent frames: the caches read and written in call
    order (diffusers' feat_cache / feat_idx), whether it is the first chunk, and the activation constraint."""

    def __init__(self, caches: Sequence[jax.Array] | None, first: bool, constrain: Callable[[jax.Array], jax.Array]):
        self.old = caches
        self.new: list[jax.Array] = []
        self.first = first
        self.constrain = constrain

    def swap(self, x: jax.Array) -> jax.Array:
        """The cache for the conv about to read `x` [V T H W C], and records [cache, x]'s last CACHE_T frames."""
        if self.old is None:  # first chunk: zero cache == diffusers' zero temporal padding
            old = jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
        else:
            old = self.old[len(self.new)]
        self.new.append(self.constrain(jnp.concatenate([old, x], axis=1)[:, -CACHE_T:]))  # [V 2 H W C]
        return old

    def skip(self, x: jax.Array) -> None:
        """Records a zero cache for a conv that does not run on this chunk (time_conv on the first chunk)."""
        self.new.append(self.constrain(jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)))


class CausalConv3d(nnx.Module):
    """Conv3d, causal in time (left context from the chunk's cache), 'same' zero padding in H and W.
    A (1, kh, kw) kernel is a per-frame Conv2d and uses no cache."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], *, dtype, precision):
        assert kernel[0] in (1, CACHE_T + 1), f"temporal kernel {kernel[0]}: the cache holds {CACHE_T} frames"
        self.weight = nnx.Param(jnp.zeros((*kernel, cin, cout), dtype))  # [kt kh kw I O]
        self.bias = nnx.Param(jnp.zeros((cout,), dtype))
        self.kernel, self.precision = kernel, precision

    def __call__(self, x: jax.Array, chunk: Chunk) -> jax.Array:  # [V T H W C] -> [V T H W O]
        kt, kh, kw = self.kernel
        if kt > 1:  # kt == 3: the cache holds exactly the kt - 1 frames of left context
            x = jnp.concatenate([chunk.swap(x), x], axis=1)  # [V T+2 H W C]
        y = jax.lax.conv_general_dilated(
            x, self.weight[...], window_strides=(1, 1, 1), padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=self.precision,
        )
        return chunk.constrain(y + self.bias[...])


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
            if chunk.first:
                # diffusers' 'Rep': latent frame 0 decodes to ONE video frame, and the next chunk's time_conv
                # starts from zero padding (not from frame 0), so its cache starts at zeros.
                chunk.skip(x)
            else:
                n, t, h, w, c = x.shape
                y = self.time_conv(x, chunk).reshape(n, t, h, w, 2, c)  # torch splits 2C as (2, C)
                x = y.transpose(0, 1, 4, 2, 3, 5).reshape(n, 2 * t, h, w, c)  # frames interleaved: t0a t0b t1a ...
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
        dims = [cin] + [cout] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(a, b, dtype=dtype, precision=precision) for a, b in zip(dims, dims[1:])])
        self.upsamplers = nnx.List([Resample(cout, mode, dtype=dtype, precision=precision)] if mode else [])

    def __call__(self, x: jax.Array, chunk: Chunk) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, chunk)
        for upsampler in self.upsamplers:
            x = upsampler(x, chunk)
        return x


class DupUp3D(nnx.Module):
    """DupUp3D, the parameter-free shortcut of a residual up block: each input channel repeated, the copies laid
    out as ft frames x fs x fs pixels of `cout` channels. On the first chunk it keeps the last of each frame's ft
    copies only, as the upsampler's skipped time_conv makes one frame there."""

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
        return x[:, self.ft - 1:] if chunk.first else x


class ResidualUpBlock(nnx.Module):
    """WanResidualUpBlock (Wan 2.2): num_res_blocks + 1 residual blocks and an upsampler that keeps the width,
    plus a DupUp3D shortcut from the block's input to its output (both only where the block upsamples)."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, mode: str | None, *, dtype, precision):
        dims = [cin] + [cout] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(a, b, dtype=dtype, precision=precision) for a, b in zip(dims, dims[1:])])
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


class WanVaeDecoder(nnx.Module):
    """post_quant_conv + decoder (+ unpatchify): one latent chunk and its caches -> RGB video frames in [-1, 1]
    and new caches."""

    def __init__(self, config, dtype=jnp.float32):
        self.patch = config.get("patch_size") or 1  # diffusers unpatchifies when patch_size is not None; 1 is a no-op
        out_channels = config.get("out_channels", 3)
        if out_channels != 3 * self.patch**2:
            raise UserError(
                f"vae config: expected out_channels = 3 x patch_size^2 = {3 * self.patch**2} (RGB pixels), found "
                f"out_channels={out_channels} patch_size={config.get('patch_size')}"
            )
        # float32 asks for full-precision matmuls (TPUs otherwise use bf16 passes for f32 convs).
        precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT
        z = config["z_dim"]
        self.post_quant_conv = CausalConv3d(z, z, (1, 1, 1), dtype=dtype, precision=precision)
        self.decoder = Decoder3d(
            config.get("decoder_base_dim") or config["base_dim"], z, config["dim_mult"], config["num_res_blocks"],
            config["temperal_downsample"][::-1], out_channels, bool(config.get("is_residual")), dtype=dtype,
            precision=precision,
        )

    def __call__(self, z, caches, *, first: bool, constrain=lambda x: x):  # [V 1 H W C] -> [V T sH sW 3]
        """s: 8 x patch_size (8 for Wan 2.1, 16 for Wan 2.2); T: 1 frame on the first chunk, else 4."""
        chunk = Chunk(caches, first, constrain)
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


def torch_key(path: tuple) -> str:
    """The diffusers state-dict key of the parameter at `path` in WanVaeDecoder."""
    key = ".".join(str(p) for p in path)
    for pattern, repl in KEY_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


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
