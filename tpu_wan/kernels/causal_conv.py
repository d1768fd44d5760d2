"""Pallas TPU kernel: the VAE's causal convolutions (kernels kt x kh x kw, each 1 or 3) of one chip's activations,
as kt * kh * kw matmuls over shifted windows of a block held in VMEM.

XLA:TPU's convolution emitter spends 15-70 s of compile time on each 3D convolution (bench/tpu_conv_compile.py
--formulations), and the decoder has ~30; written as matmuls in XLA the convolution compiles in a second but reads
its input once per tap from HBM. Here the taps read VMEM: one grid step loads rows [th + kh - 1] of the (already
padded) input for all frames (and a block of columns where whole rows do not fit), loops over the (time, row) taps
(a `fori_loop`, so Mosaic emits one tap's code, not kt * kh) and unrolls the column shifts, accumulating
[T * th * tw, to] in float32. The grid runs output-channel tiles outer and row blocks inner, so a weight tile is
fetched once per channel tile and stays resident.

Input [N, T + kt - 1, H + kh - 1, W + kw - 1, C]: the cached frames first and a border in H and W (zeros, or the
neighbouring chips' rows and columns: tpu_wan.models.vae_conv). W must be a multiple of 8 (sublanes: the windows
reshape to rows freely). Output [N, T, H, W, O].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tpu_wan.kernels.kernel_tiling import NUM_LANES, NUM_SUBLANES, VMEM_LIMITS

ACC_BYTES = 1024 * 1024  # float32 accumulator per grid step: rows of it are re-read per tap
VMEM_LIMIT = VMEM_LIMITS["TPU v6 lite"]  # 32 MiB, as the splash kernel asks on v5e, v6e and v5p
# What one grid step may need by vmem_bytes: half the limit, as XLA places the kernel's scoped VMEM on a stack it
# shares with the program's own (a step that needed 33 MiB alone met a 58 MiB limit with 59 MiB in use there).
VMEM_BUDGET = 16 * 1024 * 1024


class NoFit(ValueError):
    """No block of a convolution fits VMEM_BUDGET (a weight tile alone can be too large: 1024 -> 1024 channels)."""


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def tiles(taps: tuple[int, int, int], t: int, h: int, w: int, c: int, o: int,
          itemsize: int) -> tuple[int, int, int]:
    """(th, tw, to): output rows, columns and channels per grid step. Whole rows where they fit (the widest column
    block, a multiple of 8 dividing w), then all output channels up to 2 x 128 lanes where they fit (else 128), then
    the most rows dividing h, with the accumulator within ACC_BYTES and the step within VMEM_BUDGET."""
    channel_tiles = [o] if o <= 2 * NUM_LANES else []
    channel_tiles += [NUM_LANES] if o > NUM_LANES and o % NUM_LANES == 0 else []
    for tw in sorted((d for d in range(NUM_SUBLANES, w + 1, NUM_SUBLANES) if w % d == 0), reverse=True):
        for to in channel_tiles:
            fits = [d for d in range(1, h + 1) if h % d == 0 and t * d * tw * _round_up(to, NUM_LANES) * 4 <= ACC_BYTES
                    and vmem_bytes(taps, t, d, tw, c, to, itemsize) <= VMEM_BUDGET]
            if fits:
                return max(fits), tw, to
    raise NoFit(f"causal_conv: no block of {t}x{h}x{w}x{c} -> {o} fits {VMEM_BUDGET >> 20} MiB of VMEM")


def vmem_bytes(taps: tuple[int, int, int], t: int, th: int, w: int, c: int, to: int, itemsize: int) -> int:
    """VMEM one grid step holds: the input block and the weight tile double-buffered, the output block likewise, the
    float32 accumulator, and a tap's temporaries (input windows, a matmul result); sublanes and lanes padded.
    Compiled by Mosaic for v6e, a step at (T 2, 36 x 40 of 192 -> 128 channels) took 33.2 MiB, this 34.8."""
    kt, kh, kw = taps
    lanes_c, lanes_o = _round_up(c, NUM_LANES), _round_up(to, NUM_LANES)
    block = (t + kt - 1) * (th + kh - 1) * _round_up(w + kw - 1, NUM_SUBLANES) * lanes_c * itemsize
    weights = kt * kh * kw * _round_up(c, NUM_SUBLANES) * lanes_o * itemsize
    out = t * th * w * lanes_o * itemsize
    window, acc = t * th * w * lanes_c * itemsize, t * th * w * lanes_o * 4
    return 2 * (block + weights + out) + 3 * window + 3 * acc


def _kernel(x_ref, w_ref, b_ref, o_ref, *, taps, precision):
    _, t, th, w, to = o_ref.shape
    c = x_ref.shape[-1]
    _, kh, kw = taps

    def time_and_row_tap(k, acc):  # k = dt * kh + dh; the column taps unrolled
        dt, dh = jax.lax.div(k, kh), jax.lax.rem(k, kh)  # k >= 0: no floor-division sign fix-up
        for dw in range(kw):
            window = x_ref[0, pl.ds(dt, t), pl.ds(dh, th), pl.ds(dw, w), :].reshape(t * th * w, c)
            acc += jnp.dot(window, w_ref[k * kw + dw], precision=precision, preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, taps[0] * kh, time_and_row_tap, jnp.zeros((t * th * w, to), jnp.float32))
    o_ref[0] = (acc + b_ref[...].astype(jnp.float32)).reshape(t, th, w, to).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("precision", "interpret"))
def causal_conv(x: jax.Array, weight: jax.Array, bias: jax.Array, *, precision=None,
                interpret: bool = False) -> jax.Array:
    """x [N, T+kt-1, H+kh-1, W+kw-1, C] padded, weight [kt, kh, kw, C, O], bias [O] -> [N, T, H, W, O] (x's dtype)."""
    kt, kh, kw, c, o = weight.shape
    n, t, h, w = x.shape[0], x.shape[1] - kt + 1, x.shape[2] - kh + 1, x.shape[3] - kw + 1
    if w % NUM_SUBLANES or x.shape[-1] != c:
        raise ValueError(f"causal_conv: expected W % 8 == 0 and {c} channels, found x {x.shape}, weight {weight.shape}")
    taps = (kt, kh, kw)
    th, tw, to = tiles(taps, t, h, w, c, o, x.dtype.itemsize)
    itemsize = x.dtype.itemsize
    cost = pl.CostEstimate(
        flops=2 * n * t * h * w * c * o * kt * kh * kw, transcendentals=0,
        # The input once per channel tile (plus each block's halo), the weights once, the output once.
        bytes_accessed=itemsize * (x.size * (o // to) * (th + kh - 1) * (tw + kw - 1) // (th * tw) + weight.size
                                   + bias.size + n * t * h * w * o))
    bw = tw + kw - 1
    if tw < w:  # column blocks: Mosaic wants whole sublanes (or the whole axis), so 8 more columns than the kw - 1
        bw = tw + NUM_SUBLANES  # a block reads, and as many zero columns past the end for the last block
        x = jnp.pad(x, ((0, 0),) * 3 + ((0, NUM_SUBLANES - kw + 1), (0, 0)))
    block = (pl.Element(1), pl.Element(t + kt - 1), pl.Element(th + kh - 1), pl.Element(bw), pl.Element(c))
    return pl.pallas_call(
        functools.partial(_kernel, taps=taps, precision=precision),
        grid=(o // to, n, h // th, w // tw),
        in_specs=[
            pl.BlockSpec(block, lambda j, v, i, k: (v, 0, i * th, k * tw, 0)),
            pl.BlockSpec((kt * kh * kw, c, to), lambda j, v, i, k: (0, 0, j)),
            pl.BlockSpec((1, to), lambda j, v, i, k: (0, j)),
        ],
        out_specs=pl.BlockSpec((1, t, th, tw, to), lambda j, v, i, k: (v, 0, i, k, j)),
        out_shape=jax.ShapeDtypeStruct((n, t, h, w, o), x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary"),
                                             vmem_limit_bytes=VMEM_LIMIT),
        cost_estimate=cost,
        interpret=interpret,
    )(x, weight.reshape(kt * kh * kw, c, o), bias.reshape(1, o))
