"""python bench/kernel_vmem.py [--smoke] [--write]

docs/KERNEL.md's two kernel tables, from the code and the TPU compiler (libtpu, deviceless: no TPU needed):

- kernel_grid_steps: the default blocks (`kernel_tiling.default_block_sizes`, bf16, D = 128) of the Wan runs'
  attention shapes under each chip limit, with their grid steps per head and `kernel_tiling.vmem_bytes`.
- kernel_vmem_needed: the least scoped VMEM Mosaic accepts for our kernel at a shape and blocks, bisected by
  compiling it for one v5e and one v6e chip with smaller and smaller `vmem_limit_bytes` (to 0.25 MiB), beside
  `vmem_bytes`, the estimate the kernel asks Mosaic for: the estimate must be an upper bound.

--write puts both tables into docs/KERNEL.md between their markers. --smoke: one small shape on v6e, bisected to
1 MiB (seconds). The last line is `rows N estimate_over_needed_min X` (X: the least vmem_bytes / needed of any
row and chip; >= 1 where the estimate bounds what Mosaic needs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
MiB = 1 << 20
# (q_len, kv_len) of one chip's attention: 75,600 video tokens at 720p x 81 frames, 32,760 at 480p, 512 text tokens;
# 4,095 = 32,760 split over 8 query shards (sequence sharding on v5e-8 / v6e-8), rounded as the dispatch rounds it.
GRID_ROWS = [((75600, 75600), "720p"), ((75600, 512), "cross"), ((32760, 32760), "480p")]
VMEM_ROWS = [((75600, 75600), (1024, 4096, 512)), ((75600, 75600), (2048, 4096, 512)),
             ((75600, 75600), (512, 1024, 512)), ((4095, 32760), (2048, 4096, 512))]
CHIPS = {"v5e": "v5e-8", "v6e": "v6e-8"}
SMOKE_ROW = ((2048, 2048), (512, 1024, 512))


def grid_steps_table() -> str:
    import jax.numpy as jnp

    from tpu_wan.kernels import kernel_tiling as kt

    lines = ["| tokens | chip limit | default (bq, bkv, bkv_compute) | grid steps per head | `vmem_bytes` |",
             "|---|---|---|---|---|"]
    limits = [(kt.VMEM_LIMITS["TPU v6 lite"], "(v5e, v6e, v5p)"), (kt.VMEM_LIMIT_BYTES, "(other chips)")]
    for (q_len, kv_len), label in GRID_ROWS:
        for limit, chips in limits if label == "720p" else limits[:1]:
            blocks = kt.effective_block_sizes(kt.default_block_sizes(q_len, kv_len, 128, jnp.bfloat16, limit),
                                              q_len, kv_len)
            lines.append(f"| {q_len:,} x {kv_len:,} ({label}) | {limit // MiB} MiB {chips} | "
                         f"({blocks.bq}, {blocks.bkv}, {blocks.bkv_compute}) | "
                         f"{kt.grid_steps(blocks, q_len, kv_len):,} | {kt.vmem_bytes(blocks, 128, jnp.bfloat16) / MiB:.2f} MiB |")
    return "\n".join(lines)


def accepts(topology: str, q_len: int, kv_len: int, blocks, vmem_limit: int) -> bool:
    """Whether Mosaic compiles our kernel (bf16, one head, D = 128) for one chip of `topology` within `vmem_limit`
    bytes of scoped VMEM. The kernel's entry refuses limits below its own estimate, so this calls the compiled
    function behind it: what is measured is Mosaic's need, not our check."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tpu_wan.kernels import splash_exp2
    from tpu_wan.runtime.mesh import make_mesh
    from tpu_wan.tpu.topology import parse_target

    mesh = make_mesh(1, 1, parse_target(topology).devices()[:1])
    args = [jax.ShapeDtypeStruct((1, n, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
            for n in (q_len, kv_len, kv_len)]
    fn = jax.jit(lambda q, k, v: splash_exp2._splash_attention(
        q, k, v, block_sizes=blocks, scale=None, window_size=None, k_smooth=False, pv_f32=False, interpret=False,
        vmem_limit_bytes=vmem_limit, mask_padding=True))
    try:
        fn.lower(*args).compile()
    except Exception as err:  # noqa: BLE001  Mosaic's refusal (any other failure shows in the message below)
        if "vmem" not in str(err).lower():
            raise
        return False
    return True


def least_vmem(topology: str, q_len: int, kv_len: int, blocks, step: int) -> int:
    """The least multiple of `step` bytes of scoped VMEM Mosaic accepts (bisection; acceptance is monotone)."""
    high = step
    while not accepts(topology, q_len, kv_len, blocks, high):
        high *= 2
    low = high // 2 if high > step else 0  # refused (or nothing)
    while high - low > step:
        mid = (low + high) // 2 // step * step
        low, high = (low, mid) if accepts(topology, q_len, kv_len, blocks, mid) else (mid, high)
    return high


def vmem_needed_table(rows, chips: dict[str, str], step: int) -> tuple[str, float]:
    import jax.numpy as jnp

    from tpu_wan.kernels import kernel_tiling as kt

    lines = ["| (q_len, kv_len) | blocks | `vmem_bytes` | " + " | ".join(f"{c} needs" for c in chips) + " |",
             "|---|---|---|" + "---|" * len(chips)]
    worst = float("inf")
    for (q_len, kv_len), sizes in rows:
        blocks = kt.effective_block_sizes(kt.BlockSizes(*sizes), q_len, kv_len)
        estimate = kt.vmem_bytes(blocks, 128, jnp.bfloat16)
        needs = [least_vmem(topology, q_len, kv_len, blocks, step) for topology in chips.values()]
        worst = min([worst, *(estimate / n for n in needs)])
        lines.append(f"| {q_len:,} x {kv_len:,} | {sizes} | {estimate / MiB:.2f} MiB | "
                     + " | ".join(f"{n / MiB:.2f} MiB" for n in needs) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="one small shape on v6e, to 1 MiB")
    parser.add_argument("--write", action="store_true", help="write both tables into docs/KERNEL.md")
    args = parser.parse_args()
    from tpu_wan import cli

    cli.setup_process(argparse.Namespace(compile_only=True))
    grid = grid_steps_table()
    print(grid)
    if args.smoke:
        vmem, worst = vmem_needed_table([SMOKE_ROW], {"v6e": "v6e-8"}, MiB)
    else:
        vmem, worst = vmem_needed_table(VMEM_ROWS, CHIPS, MiB // 4)
    print(vmem)
    if args.write and not args.smoke:
        from doc_tables import provenance, write_block

        line = provenance()  # once: the first write changes the tree
        write_block("kernel_grid_steps", grid, line, ROOT / "docs" / "KERNEL.md")
        write_block("kernel_vmem_needed", vmem, line, ROOT / "docs" / "KERNEL.md")
    print(f"rows {len(grid.splitlines()) - 2 + len(vmem.splitlines()) - 2} estimate_over_needed_min {worst:.3f}")


if __name__ == "__main__":
    main()
