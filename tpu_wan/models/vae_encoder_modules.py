"""Flax NNX modules of the Wan VAE encoders (diffusers' AutoencoderKLWan, encoder half), channels-last: Wan 2.1's
(plain down blocks, RGB in) and Wan 2.2 TI2V-5B's (2x2 pixel patches in, residual down blocks with an averaging
shortcut). Layers shared with the decoder (causal conv, RMS norm, residual and attention blocks, the mid block and
the functional causal caches, `Chunk`) are vae_modules'; so are the key mapping (`torch_keys`) and weight layouts.

diffusers encodes video frame 0 alone, then four frames per call, each call producing one latent frame (the two
temporal downsamplers halve four frames twice). Here every call takes four frames, frame 0's too: its chunk is
frame 0 and three frames of padding, and `Chunk.first` (traced) makes the layers that see time behave as
diffusers' first call does: causal convs never let later frames reach frame 0, the temporal downsamplers pass
their input through on the first call (frame 0 and padding; only frame 0 is kept), and the caches recorded are
those of frame 0 alone. One program, one compile, whatever the frame count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tpu_wan.core.errors import UserError
from tpu_wan.models.vae_conv import Conv, xla_conv
from tpu_wan.models.vae_modules import (
    CausalConv3d,
    Chunk,
    MidBlock,
    ResidualBlock,
    RMSNorm,
    pixel_patch,
    precision_for,
)

FRAMES_PER_CALL = 4  # video frames per latent frame past frame 0 (two temporal downsamplers)


def _strided_conv(x: jax.Array, weight: jax.Array, bias: jax.Array, strides, padding, precision) -> jax.Array:
    """[V T H W C] x [kt kh kw C O] -> [V T' H' W' O], explicit strides and (low, high) padding per axis."""
    y = jax.lax.conv_general_dilated(
        x, weight, window_strides=strides, padding=padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        precision=precision)
    return y + bias


class Downsample(nnx.Module):
    """WanResample for the encoder: 'downsample2d' (per frame: zero pad right and bottom by one, 3x3 conv with
    stride 2) and 'downsample3d' (then time_conv, kernel 3 stride 2 over [the previous call's last frame, x]).
    diffusers' first call skips time_conv and keeps its one frame; its cache is one frame, not CACHE_T.

    With XLA's convolution both are strided convolutions. The Pallas kernel has stride 1: the spatial conv is its
    'same' conv read at odd rows and columns (output j of the padded stride-2 conv reads rows 2j .. 2j+2, which is
    the 'same' conv's output 2j+1, its zero row past the end included), 4x that layer's work; time_conv its causal
    conv over [cache, x] read at every second frame."""

    def __init__(self, dim: int, mode: str, *, dtype, precision):
        self.resample = CausalConv3d(dim, dim, (1, 3, 3), dtype=dtype, precision=precision)  # torch resample.1
        self.time_conv = (
            CausalConv3d(dim, dim, (3, 1, 1), dtype=dtype, precision=precision) if mode == "downsample3d" else None
        )

    def __call__(self, x: jax.Array, chunk: Chunk) -> jax.Array:  # [V T H W C] -> [V T' H/2 W/2 C]
        x = chunk.constrain(_stride_2(chunk.conv, x, self.resample, spatial=True))
        if self.time_conv is None:
            return x
        n, t, h, w, c = x.shape
        old = chunk.take((n, 1, h, w, c), x.dtype)
        chunk.new.append(chunk.constrain(jnp.where(chunk.first, x[:, :1], x[:, -1:])))
        y = _stride_2(chunk.conv, jnp.concatenate([old, x], axis=1), self.time_conv, spatial=False)  # [V T/2 H W C]
        return chunk.constrain(jnp.where(chunk.first, x[:, : t // 2], y))  # first call: frame 0 passes through


def _stride_2(conv: Conv, x: jax.Array, layer: CausalConv3d, *, spatial: bool) -> jax.Array:
    """`layer` with stride 2 in H and W (`spatial`, bottom/right zero padding) or in time (no padding: x holds the
    one cached frame), by XLA's strided convolution or read off the stride-1 `conv`."""
    weight, bias = layer.weight[...], layer.bias[...]
    if conv is xla_conv:
        strides, pad = ((1, 2, 2), ((0, 0), (0, 1), (0, 1))) if spatial else ((2, 1, 1), ((0, 0),) * 3)
        return _strided_conv(x, weight, bias, strides, pad, layer.precision)
    if spatial:
        y = conv(x, weight, bias, layer.precision)  # [V T H W C], 'same'
        n, t, h, w, c = y.shape
        return y.reshape(n, t, h // 2, 2, w // 2, 2, c)[:, :, :, 1, :, 1]  # odd rows and columns, split-friendly
    return conv(x, weight, bias, layer.precision)[:, ::2]  # x: [V 1+T ...] -> T-1 frames, every second kept


class AvgDown3D(nnx.Module):
    """AvgDown3D, the parameter-free shortcut of a residual down block: ft frames x fs x fs pixels of each channel
    laid out as channels, then averaged in groups down to `cout`. A frame count that ft does not divide (diffusers'
    one-frame first call) is padded with zero frames in front: on the first call, [0, frame 0]."""

    def __init__(self, cin: int, cout: int, ft: int, fs: int):
        if cin * ft * fs * fs % cout:
            raise UserError(f"vae config: expected {cin=} x {ft=} x {fs=}^2 divisible by {cout=}")
        self.cout, self.ft, self.fs, self.group = cout, ft, fs, cin * ft * fs * fs // cout

    def __call__(self, x: jax.Array, chunk: Chunk) -> jax.Array:  # [V T H W C] -> [V T/ft H/fs W/fs O]
        if self.ft > 1:
            shifted = jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))  # [0, frame 0, padding...]
            x = jnp.where(chunk.first, shifted, x)
        n, t, h, w, c = x.shape
        ft, fs = self.ft, self.fs
        # torch's channel c * factor + (t_off, h_off, w_off), then groups of `group` consecutive channels averaged
        x = x.reshape(n, t // ft, ft, h // fs, fs, w // fs, fs, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(n, t // ft, h // fs, w // fs, self.cout, self.group)
        return chunk.constrain(jnp.mean(x, axis=-1))


class ResidualDownBlock(nnx.Module):
    """WanResidualDownBlock (Wan 2.2): num_res_blocks residual blocks and an optional downsampler, plus an
    AvgDown3D shortcut from the block's input to its output."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, temporal: bool, down: bool, *, dtype, precision):
        kw = dict(dtype=dtype, precision=precision)
        self.avg_shortcut = AvgDown3D(cin, cout, 2 if temporal else 1, 2 if down else 1)
        self.resnets = nnx.List([ResidualBlock(cin if i == 0 else cout, cout, **kw) for i in range(num_res_blocks)])
        mode = "downsample3d" if temporal else "downsample2d"
        self.downsampler = Downsample(cout, mode, **kw) if down else None

    def __call__(self, x: jax.Array, chunk: Chunk) -> jax.Array:
        shortcut = x
        for resnet in self.resnets:
            x = resnet(x, chunk)
        if self.downsampler is not None:
            x = self.downsampler(x, chunk)
        return chunk.constrain(x + self.avg_shortcut(shortcut, chunk))


class Encoder3d(nnx.Module):
    """WanEncoder3d: conv_in, down blocks (Wan 2.1: a flat list of residual blocks and downsamplers; Wan 2.2:
    residual down blocks), mid block, norm, SiLU, conv_out to 2 x z_dim channels (mean and log-variance). No
    attention in the down blocks: diffusers' encoder cannot run one (attn_scales is [] in every Wan VAE), and the
    decoder ignores attn_scales too."""

    def __init__(self, cin, dim, z2, dim_mult, num_res_blocks, temperal_downsample, is_residual, *, dtype, precision):
        kw = dict(dtype=dtype, precision=precision)
        dims = [dim * u for u in [1, *dim_mult]]
        self.conv_in = CausalConv3d(cin, dims[0], (3, 3, 3), **kw)
        blocks = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dim_mult) - 1
            if is_residual:
                temporal = temperal_downsample[i] if not last else False
                blocks.append(ResidualDownBlock(din, dout, num_res_blocks, temporal, not last, **kw))
                continue
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(din, dout, **kw))
                din = dout
            if not last:
                blocks.append(Downsample(dout, "downsample3d" if temperal_downsample[i] else "downsample2d", **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], **kw)
        self.norm_out = RMSNorm(dims[-1], dtype=dtype)
        self.conv_out = CausalConv3d(dims[-1], z2, (3, 3, 3), **kw)

    def __call__(self, x: jax.Array, chunk: Chunk) -> jax.Array:  # [V 4 H W C] -> [V 1 H/8 W/8 2z]
        x = self.conv_in(x, chunk)
        for layer in self.down_blocks:
            x = layer(x, chunk)
        x = self.mid_block(x, chunk)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), chunk)


def patchify(x: jax.Array, p: int) -> jax.Array:  # [V T pH pW C] -> [V T H W C*p*p]
    """diffusers' patchify: pixel (r, q) of channel c (r along H, q along W) becomes channel c*p*p + q*p + r."""
    n, t, h, w, c = x.shape
    x = x.reshape(n, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)  # [V T H W C q r]
    return x.reshape(n, t, h // p, w // p, c * p * p)


class WanVaeEncoder(nnx.Module):
    """(patchify +) encoder + quant_conv: one chunk of four video frames and its caches -> one latent frame's
    distribution parameters [V 1 h w 2z] (mean, then log-variance, as diffusers' DiagonalGaussianDistribution
    splits them) and new caches."""

    def __init__(self, config, dtype=jnp.float32):
        self.patch = pixel_patch(config, "in_channels")
        in_channels, precision = 3 * self.patch**2, precision_for(dtype)
        z2 = 2 * config["z_dim"]
        self.encoder = Encoder3d(
            in_channels, config["base_dim"], z2, config["dim_mult"], config["num_res_blocks"],
            config["temperal_downsample"], bool(config.get("is_residual")),
            dtype=dtype, precision=precision,
        )
        self.quant_conv = CausalConv3d(z2, z2, (1, 1, 1), dtype=dtype, precision=precision)

    def __call__(self, x, caches, *, first, constrain=lambda x: x, conv: Conv = xla_conv):
        """[V 4 sH sW 3] -> [V 1 H W 2z] with s = 8 x patch_size. caches None: zeros, those before frame 0. `first`:
        the chunk is video frame 0 and three frames of padding (diffusers' one-frame first call). conv: the
        convolution (tpu_wan.models.vae_conv)."""
        chunk = Chunk(caches, first, constrain, conv)
        if self.patch > 1:
            x = constrain(patchify(x, self.patch))
        return self.quant_conv(self.encoder(x, chunk), chunk), tuple(chunk.new)
