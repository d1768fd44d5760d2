"""python bench/tpu_conv_compile.py [--write] [--topology v6e-1] [--sizes 64x96 240x416] [--smoke]
       python bench/tpu_conv_compile.py --formulations [--shape 1,5,90,20,384] [--write] [--smoke]

How long the TPU compiler (libtpu, deviceless, on this CPU) takes for one layer of the VAE decoder's kinds: the
causal 3x3x3 convolution over [1, 5, H, W, 96] (3 new frames + 2 cached), one 3x3 2D convolution of a frame,
and a 1x1 projection (a matmul) of the same activations, in float32 (the VAE's default) and bfloat16. Each program
is compiled once in this process, one after the other. The table gives compile seconds per program; the last line
is `conv3d_over_matmul <ratio at the first size, float32> conv3d_f32_s <seconds>`.

--formulations: the causal 3x3x3 convolution as the VAE runs it (float32, HIGHEST precision, input [N T+2 H W C]
holding the 2 cached frames; default: the widest layer's activations per chip at 720p on v6e-8, latents 90x160
split 8 ways along W) written the ways that avoid XLA:TPU's convolution emitter, each judged by compile seconds and
the compiled program's own bytes accessed and temporaries against XLA's convolution, with our Pallas kernel (its
bytes: its declared cost); then three convolutions in a row against a `fori_loop` of one over their stacked weights
(what `vae_modules.ResidualRun` does). Last line: `loop_over_unrolled <compile s ratio> best_bytes_ratio <least bytes
accessed of the XLA reformulations / conv3d's>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="v6e-1")
    parser.add_argument("--sizes", nargs="+", default=["64x96", "240x416"], help="HxW of the activations")
    parser.add_argument("--channels", type=int, default=96)
    parser.add_argument("--smoke", action="store_true", help="one small size, float32, 8 channels")
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    parser.add_argument("--formulations", action="store_true", help="the 3x3x3 conv written other ways, and looped")
    parser.add_argument("--shape", default="1,5,90,20,384", help="--formulations: N,T+2,H,W,C of the input")
    args = parser.parse_args()
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tpu_wan.runtime.mesh import make_mesh
    from tpu_wan.tpu import topology

    mesh = make_mesh(1, 1, topology.parse_target(args.topology).devices()[:1])
    placed = NamedSharding(mesh, P())
    if args.formulations:
        from conv_formulations import compare

        shape = (1, 4, 8, 8, 8) if args.smoke else tuple(int(v) for v in args.shape.split(","))
        table, last = compare(shape, placed)
        if args.write and not args.smoke:
            sys.path.insert(0, str(ROOT / "bench"))
            from doc_tables import provenance, write_block

            write_block("tpu_conv_formulations", "\n".join(table), provenance())
        print(last)
        return
    c = 8 if args.smoke else args.channels
    sizes = ["16x16"] if args.smoke else args.sizes
    dtypes = ["float32"] if args.smoke else ["float32", "bfloat16"]

    def conv3d(x, w):  # x [N T+2 H W C], w [3 3 3 C C]
        return jax.lax.conv_general_dilated(x, w, (1, 1, 1), ((0, 0), (1, 1), (1, 1)),
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

    def conv2d(x, w):  # one frame
        return jax.lax.conv_general_dilated(x[:, 0], w[0], (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def matmul(x, w):
        return jnp.einsum("nthwc,co->nthwo", x, w[0, 0, 0])

    table = ["| size | dtype | conv3d s | conv2d s | matmul s |", "|---|---|---|---|---|"]
    print(*table, sep="\n")
    first = None
    for size in sizes:
        h, w = (int(v) for v in size.split("x"))
        for dtype in dtypes:
            x = jax.ShapeDtypeStruct((1, 5, h, w, c), jnp.dtype(dtype), sharding=placed)
            k = jax.ShapeDtypeStruct((3, 3, 3, c, c), jnp.dtype(dtype), sharding=placed)
            seconds = []
            for fn in (conv3d, conv2d, matmul):
                start = time.perf_counter()
                jax.jit(fn).lower(x, k).compile()
                seconds.append(time.perf_counter() - start)
            first = first or seconds
            table.append(f"| {h}x{w}x{c} | {dtype} | " + " | ".join(f"{s:.1f}" for s in seconds) + " |")
            print(table[-1], flush=True)
    if args.write and not args.smoke:
        sys.path.insert(0, str(ROOT / "bench"))
        from doc_tables import provenance, write_block

        write_block("tpu_conv_compile", "\n".join(table), provenance())
    print(f"conv3d_over_matmul {first[0] / first[2]:.1f} conv3d_f32_s {first[0]:.1f}")


if __name__ == "__main__":
    main()
