"""The exp2 splash kernel's tiling arithmetic, without Pallas: block sizes, the VMEM a grid step needs, the
scoped VMEM limit per chip, per-shape default blocks, grid steps and attended pairs (docs/KERNEL.md).

tpu_wan.kernels.splash_exp2 runs with these blocks; tpu_wan.runtime.attention and tpu_wan.run.attention_tuning
choose and report them without importing the kernel.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

NUM_LANES = 128  # a TPU vreg is 8 sublanes x 128 lanes (32-bit)
NUM_SUBLANES = 8

# Scoped VMEM a kernel asks Mosaic for (CompilerParams(vmem_limit_bytes=...)), per chip: the kernel entry refuses
# blocks whose vmem_bytes exceed it and the default blocks are picked within it. Physical VMEM per core (see
# vmem_capacity_bytes in jax/_src/pallas/mosaic/tpu_info.py): v2-v4 16 MiB, v5p 64 MiB, v5e and v6e 128 MiB.
# Half of that, capped at 32 MiB, leaves XLA's own scoped VMEM room; v5e, v6e and v5p all compile kernels asking
# for it (tests/test_kernel_compile.py). VMEM_LIMIT_BYTES, the smallest, serves older chips, unknown ones and the
# interpreter, so a check on CPU refuses what any TPU could not run.
VMEM_LIMIT_BYTES = 16 * 1024 * 1024
VMEM_LIMITS = {"TPU v5 lite": 32 * 1024 * 1024, "TPU v6 lite": 32 * 1024 * 1024, "TPU v5": 32 * 1024 * 1024}


def vmem_limit_for(device_kind: str | None) -> int:
    """The scoped VMEM limit for a chip (its jax device_kind); VMEM_LIMIT_BYTES for any other."""
    return VMEM_LIMITS.get(device_kind, VMEM_LIMIT_BYTES)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. They change speed and VMEM use, not the math (up to float32 summation order).

    bq: query rows per grid step. bkv: key/value rows per grid step (one DMA'd block). bkv_compute: key rows
    per inner compute step, so the logits tile is [bq, bkv_compute]; bkv must be a multiple of it. All are
    multiples of 8 (TPU sublanes); compiled (non-interpret) kernels also need bkv_compute % 128 == 0 because it
    is the lane dimension of the logits tile.
    """

    bq: int = 512
    bkv: int = 1024
    bkv_compute: int = 512

    def __post_init__(self):
        for name in ("bq", "bkv", "bkv_compute"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, found {value!r}")
            if value % NUM_SUBLANES:
                raise ValueError(f"BlockSizes.{name}={value} must be a multiple of {NUM_SUBLANES} (TPU sublanes)")
        if self.bkv % self.bkv_compute:
            raise ValueError(f"bkv={self.bkv} must be a multiple of bkv_compute={self.bkv_compute}")


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def effective_block_sizes(block_sizes: BlockSizes, q_len: int, kv_len: int) -> BlockSizes:
    """The blocks the kernel runs with: bq and bkv shrunk to the (padded) sequence, so short sequences do not
    pay for padding (bkv stays a multiple of bkv_compute)."""
    bc = block_sizes.bkv_compute
    return BlockSizes(bq=min(block_sizes.bq, round_up(q_len, NUM_SUBLANES)),
                      bkv=min(block_sizes.bkv, round_up(kv_len, bc)), bkv_compute=bc)


def vmem_bytes(block_sizes: BlockSizes, head_dim: int, dtype) -> int:
    """VMEM one grid step needs: the double-buffered q, k, v, o blocks, the float32 scratch (m, l, acc) and
    the float32 logits and probabilities of one [bq, bkv_compute] chunk (Mosaic keeps tiles that large in VMEM,
    not in the 64 vregs). Lanes are padded to 128 as VMEM tiles are, so head_dim 64 costs what 128 does."""
    bq, bkv, bc = block_sizes.bq, block_sizes.bkv, block_sizes.bkv_compute
    d = round_up(head_dim, NUM_LANES)
    blocks = 2 * (2 * bq * d + 2 * bkv * d) * jnp.dtype(dtype).itemsize  # q + o, k + v; x2 double buffering
    scratch = (2 * bq * NUM_LANES + bq * d) * 4  # m and l (lane-replicated), acc
    chunk = 2 * bq * round_up(bc, NUM_LANES) * 4  # logits s and probabilities p
    return blocks + scratch + chunk


def check_vmem(block_sizes: BlockSizes, q_len: int, kv_len: int, head_dim: int, dtype,
               limit: int = VMEM_LIMIT_BYTES) -> None:
    """Raises ValueError if the blocks the kernel would run with at this shape need more than `limit` bytes."""
    blocks = effective_block_sizes(block_sizes, q_len, kv_len)
    need = vmem_bytes(blocks, head_dim, dtype)
    if need > limit:
        raise ValueError(
            f"block sizes (bq={blocks.bq}, bkv={blocks.bkv}, bkv_compute={blocks.bkv_compute}) need {need} bytes "
            f"({need / 2**20:.2f} MiB) of VMEM at head_dim={head_dim} {jnp.dtype(dtype).name}: expected at most "
            f"the chip's VMEM limit of {limit} bytes ({limit / 2**20:.0f} MiB, see docs/KERNEL.md)")


def check_lanes(block_sizes: BlockSizes) -> None:
    """Compiled kernels hold a [bq, bkv_compute] logits tile, whose lane dimension Mosaic splits in 128s."""
    if block_sizes.bkv_compute % NUM_LANES:
        raise ValueError(f"bkv_compute a multiple of {NUM_LANES} (lanes of the logits tile) for a compiled kernel, "
                         f"found {block_sizes.bkv_compute}; interpret=True takes other sizes")


def attended_pairs(q_len: int, kv_len: int, window_size: int | None = None) -> int:
    """(query, key) pairs inside the attention pattern: q_len * kv_len, or with a window W (self-attention,
    q_len == kv_len) those with |i - j| <= W."""
    if window_size is None:
        return q_len * kv_len
    w = min(window_size, kv_len - 1)
    return kv_len + 2 * (w * kv_len - w * (w + 1) // 2)  # the diagonal, then each offset 1..w on both sides


# Per-shape defaults: the fewest grid steps (each costs ~0.35 us of pipeline overhead besides its MXU work) among
# blocks that fit the VMEM limit and waste little: padded query rows are computed in full, so bq may pad the
# query length by _Q_PAD_TOLERANCE; key chunks that hold only padding are skipped, so a large bkv costs only the
# DMA of its padded rows, up to _KV_PAD_TOLERANCE of the key length. Ties: larger bq (each query block reads all
# of K and V once, so fewer query blocks is less HBM traffic).
_MAX_BQ, _MAX_BKV, _DEFAULT_BC = 2048, 4096, 512
_Q_PAD_TOLERANCE = 0.005
_KV_PAD_TOLERANCE = 0.03


def _block_candidates(length: int, step: int, largest: int, tolerance: float) -> list[int]:
    """Multiples of `step` up to `largest` (or the padded length) padding `length` by at most `tolerance` of it,
    or by as little as any candidate does."""
    top = max(step, min(largest, round_up(length, step)))
    waste = {b: round_up(length, b) - length for b in range(step, top + 1, step)}
    allowed = max(min(waste.values()), tolerance * length)
    return [b for b, w in waste.items() if w <= allowed]


def grid_steps(blocks: BlockSizes, q_len: int, kv_len: int) -> int:
    """Grid steps per head: query blocks x key blocks (after shrinking to the sequence)."""
    b = effective_block_sizes(blocks, q_len, kv_len)
    return -(-q_len // b.bq) * -(-kv_len // b.bkv)


def default_block_sizes(q_len: int, kv_len: int, head_dim: int = 128, dtype=jnp.bfloat16,
                        vmem_limit: int = VMEM_LIMIT_BYTES) -> BlockSizes:
    """The blocks with the fewest grid steps that fit `vmem_limit` and waste little padding (see above)."""
    bc = min(_DEFAULT_BC, round_up(kv_len, NUM_LANES))
    fitting = [BlockSizes(bq, bkv, bc)
               for bq in _block_candidates(q_len, 2 * NUM_SUBLANES, _MAX_BQ, _Q_PAD_TOLERANCE)  # bf16 packs 16 rows
               for bkv in _block_candidates(kv_len, bc, _MAX_BKV, _KV_PAD_TOLERANCE)
               if vmem_bytes(BlockSizes(bq, bkv, bc), head_dim, dtype) <= vmem_limit]
    if not fitting:
        return BlockSizes(2 * NUM_SUBLANES, bc, bc)
    return min(fitting, key=lambda b: (grid_steps(b, q_len, kv_len), -b.bq, -b.bkv))
