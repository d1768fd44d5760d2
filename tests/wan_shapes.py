"""The attention shapes and kernel blocks one TPU chip gets in the Wan runs: what the kernel tests compile for
TPU generations (test_kernel_compile.py) and run in the interpreter (test_splash_kernel.py)."""

import math
import types

import jax.numpy as jnp

from tpu_wan.core.batch import default_batch_size
from tpu_wan.kernels import kernel_tiling
from tpu_wan.runtime import attention
from tpu_wan.tpu import topology

# L = F * H/16 * W/16 video tokens: 21 * 30 * 52 = 32,760 at 480p x 81 frames, 21 * 45 * 80 = 75,600 at 720p;
# S = 512 text tokens. Heads: 12 (1.3B), 40 (14B); head dim 128.
VIDEO_TOKENS, TEXT_TOKENS, HEADS = (32760, 75600), 512, (12, 40)
SLICES = ("v5e-4", "v5e-8", "v6e-4", "v6e-8", "v5p-8")
GENERATIONS = {"v5e": "TPU v5 lite", "v6e": "TPU v6 lite", "v5p": "TPU v5"}


def dispatch_shapes() -> set[tuple[int, int]]:
    """(q_len, kv_len) per chip of every attention call the dispatch makes for 1.3B and 14B at 480p and 720p on
    SLICES, every (dp, tp) the heads allow, with CFG (batch 2 x the default videos per batch) and for one video
    without it (batch 1: the query sequence splits over dp)."""
    shapes = set()
    for name in SLICES:
        chips = topology.parse_target(name).chips
        for heads in HEADS:
            for tp in (t for t in (1, 2, 4, 8) if chips % t == 0 and heads % t == 0):
                dp = chips // tp
                mesh = types.SimpleNamespace(shape={"dp": dp, "tp": tp})
                for batch in (2 * default_batch_size(dp, True), 1):
                    _, _, seq_axes = attention._shard_specs(mesh, batch, heads)
                    shards = math.prod(mesh.shape[a] for a in seq_axes)
                    for tokens in VIDEO_TOKENS:
                        q_len = -(-tokens // shards)
                        shapes |= {(q_len, tokens), (q_len, TEXT_TOKENS)}
    return shapes


def default_blocks() -> dict[kernel_tiling.BlockSizes, list[tuple[str, int, int]]]:
    """Each distinct default block choice (bf16, D = 128) of the dispatch shapes on each generation -> the
    (generation, q_len, kv_len) it serves."""
    blocks = {}
    for generation, kind in GENERATIONS.items():
        limit = kernel_tiling.vmem_limit_for(kind)
        for q_len, kv_len in sorted(dispatch_shapes()):
            chosen = kernel_tiling.default_block_sizes(q_len, kv_len, 128, jnp.bfloat16, limit)
            blocks.setdefault(kernel_tiling.effective_block_sizes(chosen, q_len, kv_len), []).append(
                (generation, q_len, kv_len))
    return blocks
