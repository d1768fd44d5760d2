"""Time the VAE decoder's 3x3x3 causal convolutions alone: XLA (ours) vs torch, and rewrites of ours.

    .venv/bin/python bench/conv3d.py [--repeats 5] [--smoke] [--write]

For the three channel widths of the real Wan 2.1 VAE decoder at a 9 x 128 x 128 decode (96 channels at 128 x 128,
192 at 64 x 64, 384 at 32 x 32; float32, batch 1, the causal time padding already applied as our decoder's cache
does), the median time of `jax.lax.conv_general_dilated` (channels-last, as tpu_wan/models/vae_modules.py calls it),
`torch.nn.functional.conv3d` (channels-first, as diffusers calls it), and three rewrites of the XLA one: the
time taps as three 2D convolutions summed, the time taps folded into channels for one 2D convolution, and
im2col + matmul. Prints GFLOP/s per row; the last line is `xla_over_torch <at 96 channels> <192> <384>`.
--smoke: the same three rows at 8, 16 and 32 channels and a quarter of the size, one timed call each (seconds).
bench/vae_decode.py times the whole decoder; this says how much of its gap the convolutions explain.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

SHAPES = ((96, 6, 128), (192, 6, 64), (384, 4, 32))  # channels, input frames (2 cached + new), height = width
SMOKE_SHAPES = ((8, 6, 32), (16, 6, 16), (32, 4, 8))
_DN3 = ("NDHWC", "DHWIO", "NDHWC")
_DN2 = ("NHWC", "HWIO", "NHWC")


def conv3d(x, w):  # x [N T H W C], w [3 3 3 C C] -> [N T-2 H W C]
    return jax.lax.conv_general_dilated(x, w, (1, 1, 1), [(0, 0), (1, 1), (1, 1)], dimension_numbers=_DN3)


def sum_of_2d(x, w):
    t = x.shape[1] - 2
    out = 0
    for i in range(3):
        frames = x[:, i : i + t].reshape(-1, *x.shape[2:])  # [N*T H W C]
        out = out + jax.lax.conv_general_dilated(frames, w[i], (1, 1), [(1, 1), (1, 1)], dimension_numbers=_DN2)
    return out.reshape(x.shape[0], t, *out.shape[1:])


def folded_2d(x, w):
    t, c = x.shape[1] - 2, x.shape[-1]
    stacked = jnp.concatenate([x[:, i : i + t] for i in range(3)], axis=-1).reshape(-1, *x.shape[2:4], 3 * c)
    kernel = jnp.transpose(w, (1, 2, 0, 3, 4)).reshape(3, 3, 3 * c, w.shape[-1])
    out = jax.lax.conv_general_dilated(stacked, kernel, (1, 1), [(1, 1), (1, 1)], dimension_numbers=_DN2)
    return out.reshape(x.shape[0], t, *out.shape[1:])


def im2col(x, w):
    t, h, wd = x.shape[1] - 2, x.shape[2], x.shape[3]
    p = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([p[:, i : i + t, j : j + h, k : k + wd] for i in range(3) for j in range(3)
                            for k in range(3)], axis=-1)  # [N T H W 27C]
    return cols @ w.reshape(-1, w.shape[-1])


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="small channels and sizes, one repeat")
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    args = parser.parse_args()
    shapes, repeats = (SMOKE_SHAPES, 1) if args.smoke else (SHAPES, args.repeats)
    print(f"jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} threads "
          f"{torch.get_num_threads()}, float32")
    ratios = []
    table = ["| channels, new frames (+2 cached), size | XLA conv3d ms (GFLOP/s) | torch conv3d ms (GFLOP/s) "
             "| XLA / torch "
             "| sum of 2D convs | folded 2D | im2col |", "|" + "---|" * 7]
    for c, t, h in shapes:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, t, h, h, c)).astype(np.float32)
        w = (rng.standard_normal((3, 3, 3, c, c)) * 0.05).astype(np.float32)
        flops = 2 * (t - 2) * h * h * c * c * 27
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        ref = jax.jit(conv3d)(xj, wj)
        row = {}
        for name, fn in (("xla conv3d", conv3d), ("sum of 2d", sum_of_2d), ("folded 2d", folded_2d),
                         ("im2col", im2col)):
            jitted = jax.jit(fn)
            diff = float(jnp.abs(jitted(xj, wj) - ref).max())
            row[name] = median_seconds(lambda: jitted(xj, wj).block_until_ready(), repeats)
            print(f"{c:4d} ch {t - 2} frames {h}x{h}: {name:10s} {row[name] * 1e3:7.0f} ms "
                  f"{flops / row[name] / 1e9:5.0f} GFLOP/s (max diff vs conv3d {diff:.1e})")
        xt = torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous()  # [N C T H W]
        wt = torch.from_numpy(w).permute(4, 3, 0, 1, 2).contiguous()  # [C_out C_in 3 3 3]
        with torch.no_grad():
            torch_s = median_seconds(lambda: torch.nn.functional.conv3d(xt, wt, padding=(0, 1, 1)), repeats)
        print(f"{c:4d} ch {t - 2} frames {h}x{h}: {'torch':10s} {torch_s * 1e3:7.0f} ms "
              f"{flops / torch_s / 1e9:5.0f} GFLOP/s")
        ratios.append(row["xla conv3d"] / torch_s)
        ms = {name: f"{seconds * 1e3:.0f}" for name, seconds in row.items()}
        table.append(f"| {c}, {t - 2}, {h} x {h} | {ms['xla conv3d']} ({flops / row['xla conv3d'] / 1e9:.0f}) | "
                     f"{torch_s * 1e3:.0f} ({flops / torch_s / 1e9:.0f}) | {ratios[-1]:.2f} | {ms['sum of 2d']} | "
                     f"{ms['folded 2d']} | {ms['im2col']} |")
    if args.write and not args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from doc_tables import provenance, write_block

        write_block("conv3d", "\n".join(table), provenance())
    print("xla_over_torch " + " ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
