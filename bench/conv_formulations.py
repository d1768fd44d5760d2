"""The VAE's causal 3x3x3 convolution written six ways (XLA's convolution, four reformulations for XLA, our Pallas
kernel), and three convolutions in a row against a loop of one, compiled for a TPU (bench/tpu_conv_compile.py
--formulations). The kernel's bytes are its own declared cost (pl.CostEstimate), not the compiler's count. Each
function takes the input [N T+2 H W C] (2 cached frames first) and the kernel [3 3 3 C O] and returns [N T H W O],
'same' padding in H and W, HIGHEST precision as the float32 VAE runs it."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def conv3d(x, w):  # what vae_modules.CausalConv3d runs
    return jax.lax.conv_general_dilated(x, w, (1, 1, 1), ((0, 0), (1, 1), (1, 1)),
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=HIGHEST)


def time_taps_2d(x, w):  # a 2D conv per time tap, frames folded into the batch, summed
    n, t2, h, wd, c = x.shape
    t = t2 - 2
    out = 0
    for dt in range(3):
        frames = x[:, dt:dt + t].reshape(n * t, h, wd, c)
        out = out + jax.lax.conv_general_dilated(frames, w[dt], (1, 1), ((1, 1), (1, 1)),
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    return out.reshape(n, t, h, wd, -1)


def time_on_channels_2d(x, w):  # the 3 time taps concatenated on channels: one 2D conv over 3C
    n, t2, h, wd, c = x.shape
    t = t2 - 2
    frames = jnp.concatenate([x[:, dt:dt + t] for dt in range(3)], -1).reshape(n * t, h, wd, 3 * c)
    kernel = w.transpose(1, 2, 0, 3, 4).reshape(3, 3, 3 * c, -1)
    out = jax.lax.conv_general_dilated(frames, kernel, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    return out.reshape(n, t, h, wd, -1)


def _padded(x):
    return jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))


def shifted_matmuls(x, w):  # 27 matmuls over shifted windows, summed
    t, h, wd = x.shape[1] - 2, x.shape[2], x.shape[3]
    xp, out = _padded(x), 0
    for dt in range(3):
        for dh in range(3):
            for dw in range(3):
                window = xp[:, dt:dt + t, dh:dh + h, dw:dw + wd]
                out = out + jnp.einsum("nthwc,co->nthwo", window, w[dt, dh, dw], precision=HIGHEST)
    return out


def im2col(x, w):  # the 27 windows concatenated on channels: one matmul over 27C
    t, h, wd, c = x.shape[1] - 2, x.shape[2], x.shape[3], x.shape[4]
    xp = _padded(x)
    cols = jnp.concatenate([xp[:, dt:dt + t, dh:dh + h, dw:dw + wd]
                            for dt in range(3) for dh in range(3) for dw in range(3)], -1)
    return jnp.einsum("nthwc,co->nthwo", cols, w.reshape(27 * c, -1), precision=HIGHEST)


def pallas_kernel(x, w):  # tpu_wan.kernels.causal_conv, as vae_conv runs it on one chip: zero border, W to sublanes
    from tpu_wan.kernels.causal_conv import causal_conv

    wd = x.shape[3]
    x = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1 + -wd % 8), (0, 0)))
    return causal_conv(x, w, jnp.zeros(w.shape[-1], x.dtype), precision=HIGHEST)[:, :, :, :wd]


FORMULATIONS = {f.__name__: f for f in (conv3d, time_taps_2d, time_on_channels_2d, shifted_matmuls, im2col,
                                        pallas_kernel)}
LAYERS = 3  # convolutions in a row, as a same-width residual run has (2 per block)


def _causal(x, w):  # one layer of a run: [N T+2 ...] -> the same shape (its 2 leading frames as the next cache)
    y = jax.nn.silu(conv3d(x, w))
    return jnp.concatenate([x[:, :2], y], axis=1)


def unrolled(x, ws):
    for i in range(LAYERS):
        x = _causal(x, ws[i])
    return x


def looped(x, ws):
    return jax.lax.fori_loop(0, LAYERS, lambda i, x: _causal(x, ws[i]), x)


def _compile(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return seconds, float(cost.get("bytes accessed", 0.0)), compiled.memory_analysis().temp_size_in_bytes


def compare(shape: tuple[int, ...], sharding) -> tuple[list[str], str]:
    """The markdown table and the last line, each program compiled once, one after the other."""
    c = shape[-1]
    x = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    w = jax.ShapeDtypeStruct((3, 3, 3, c, c), jnp.float32, sharding=sharding)
    ws = jax.ShapeDtypeStruct((LAYERS, 3, 3, 3, c, c), jnp.float32, sharding=sharding)
    table = [f"input {list(shape)}, kernel 3x3x3x{c}x{c}, float32 HIGHEST", "",
             "| program | compile s | bytes accessed / conv3d's | temp MiB |", "|---|---|---|---|"]
    print(*table, sep="\n", flush=True)
    rows = {}
    for name, fn in FORMULATIONS.items():
        rows[name] = _compile(fn, x, w)
    # XLA's cost analysis counts a loop body once: the loop's bytes are per trip, so not compared here.
    rows[f"{LAYERS} conv3d unrolled"] = _compile(unrolled, x, ws)
    rows[f"{LAYERS} conv3d as a fori_loop"] = _compile(looped, x, ws)
    base = rows["conv3d"][1]
    for name, (seconds, moved, temp) in rows.items():
        ratio = f"{moved / base:.2f}" if name in FORMULATIONS else "(loop body counted once)"
        table.append(f"| {name} | {seconds:.1f} | {ratio} | {temp / 2**20:.1f} |")
        print(table[-1], json.dumps({"program": name, "compile_s": round(seconds, 2), "bytes": moved}), flush=True)
    best = min(rows[n][1] for n in FORMULATIONS if n not in ("conv3d", "pallas_kernel")) / base
    loop = rows[f"{LAYERS} conv3d as a fori_loop"][0] / rows[f"{LAYERS} conv3d unrolled"][0]
    return table, f"loop_over_unrolled {loop:.2f} best_bytes_ratio {best:.2f}"
