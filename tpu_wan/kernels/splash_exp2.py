"""Flash-attention forward as a Pallas TPU kernel whose online softmax works in base 2.

`splash_attention(q, k, v)` computes softmax(q k^T * scale) v for one device's data (q [N, L, D], k and v
[N, S, D]; sharding over devices happens outside, with shard_map). It is built like upstream
jax.experimental.pallas.ops.tpu.splash_attention: a grid (heads, query blocks, key blocks) whose key axis is
sequential, the running softmax statistics and the output accumulator in float32 VMEM scratch, and an inner loop
over `bkv_compute`-sized chunks of each `bkv`-sized key block that was DMA'd into VMEM.

Base 2: softmax(x) = 2^(x log2 e) / sum 2^(x log2 e). The softmax scale and log2(e) are folded into q once,
before the kernel (as upstream folds its scale), so the logits arrive in base 2 and the online softmax calls
exp2 on them with no multiply per logit. Mosaic has a native exp (vexp) as well as exp2 (vpow2): base 2 alone
saves nothing, the fold is what removes the per-logit multiply (docs/KERNEL.md counts both in Mosaic's LLO).

`attention_reference` is the plain float32 softmax attention the kernel is tested against.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tpu_wan.kernels.kernel_tiling import (
    NUM_LANES,
    VMEM_LIMIT_BYTES,
    BlockSizes,
    attended_pairs,
    check_lanes,
    check_vmem,
    effective_block_sizes,
    round_up,
)

LOG2_E = math.log2(math.e)
# Masked logits become MASK_VALUE rather than -inf: the online softmax subtracts the running max from the
# logits and from the previous max, and with -inf a row whose chunk is fully masked (a window edge, padding)
# would compute -inf - (-inf) = NaN. A finite value gives 2^(MASK - MASK) = 1 there instead: those bogus
# terms are wiped by alpha = 2^(MASK - m_real) = 0 as soon as the row meets a real key (every real row does:
# it sees at least itself or, without a window, key 0), and against a real max 2^(MASK - m) = 0 exactly.
# -1e30 is far below any real logit yet far from overflow (m - MASK stays finite in float32).
MASK_VALUE = -1e30
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_NT_DIMS = (((1,), (1,)), ((), ()))  # [a, d] x [b, d] -> [a, b]
_NN_DIMS = (((1,), (0,)), ((), ()))  # [a, b] x [b, d] -> [a, d]


def _check_inputs(q, k, v, window_size):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            raise ValueError(f"{name} must be [heads, length, head_dim] (ndim 3), found shape {tuple(x.shape)}")
        if jnp.dtype(x.dtype) not in _DTYPES:
            raise ValueError(f"{name} dtype must be float32 or bfloat16, found {jnp.dtype(x.dtype)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype, found {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, found {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must share heads N and head_dim D, expected [{k.shape[0]}, L, {k.shape[2]}], "
                         f"found q {tuple(q.shape)}")
    if 0 in q.shape or 0 in k.shape:
        raise ValueError(f"empty inputs: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if window_size is not None:
        if not isinstance(window_size, numbers.Integral) or isinstance(window_size, bool) or window_size < 0:
            raise ValueError(f"window_size must be a non-negative int or None, found {window_size!r}")
        if q.shape[1] != k.shape[1]:
            raise ValueError("window_size needs self-attention (query length == key length), "
                             f"expected L == S, found L={q.shape[1]}, S={k.shape[1]}")


def attention_reference(q, k, v, *, block_sizes: BlockSizes | None = None, scale: float | None = None,
                        window_size: int | None = None, k_smooth: bool = False, pv_f32: bool = False,
                        interpret: bool = False, vmem_limit_bytes: int = VMEM_LIMIT_BYTES) -> jax.Array:
    """softmax(q k^T * scale) v computed in float32 (HIGHEST matmul precision), returned as float32.

    Takes splash_attention's keywords, like upstream's reference. block_sizes, k_smooth, pv_f32, interpret and
    vmem_limit_bytes are ignored: tiling and the interpreter do not change the math, subtracting the mean key shifts every
    logit of a row by the same amount, and the P.V precision is a rounding choice; none changes the exact
    result this computes.
    """
    del block_sizes, k_smooth, pv_f32, interpret, vmem_limit_bytes
    _check_inputs(q, k, v, window_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    f32, hi = jnp.float32, lax.Precision.HIGHEST
    s = jnp.einsum("nld,nsd->nls", q.astype(f32), k.astype(f32), precision=hi) * scale
    if window_size is not None:
        i, j = jnp.arange(q.shape[1])[:, None], jnp.arange(k.shape[1])[None, :]
        s = jnp.where(jnp.abs(i - j) <= window_size, s, -jnp.inf)  # the diagonal keeps every row non-empty
    return jnp.einsum("nls,nsd->nld", jax.nn.softmax(s, axis=-1), v.astype(f32), precision=hi)


def _lanes(x, n):
    """A lane-replicated [rows, 128] statistic as [rows, n] (tile it, or take a prefix, like upstream)."""
    reps, rem = divmod(n, NUM_LANES)
    if rem == 0:
        return jnp.tile(x, (1, reps)) if reps > 1 else x
    return x[:, :n] if n < NUM_LANES else jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _any(*conds):
    conds = [c for c in conds if c is not None]
    return functools.reduce(jnp.logical_or, conds) if conds else None


def _all(*conds):
    conds = [c for c in conds if c is not None]
    return functools.reduce(jnp.logical_and, conds) if conds else None


def _kernel(q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, bq, bkv, bc, q_len, kv_len,
            kv_pad_len, window, mask_padding, pv_f32):
    """One (head, query block, key block) grid step. Scratch, all float32 and kept across the key blocks of a
    query block: m_ref [bq, 128] the running row max of the base-2 logits, l_ref [bq, 128] the running row sum
    of 2^(s - m) (both replicated over lanes, the layout the VPU wants), acc_ref [bq, D] the running
    unnormalised output sum_j 2^(s_j - m) v_j."""
    i, j = pl.program_id(1), pl.program_id(2)
    num_kv_blocks = kv_pad_len // bkv
    f32 = jnp.float32

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    q = q_ref[...]
    # Rows of this block that matter (padded query rows are sliced off; they only need to stay finite).
    r0, r1 = i * bq, jnp.minimum(i * bq + bq - 1, q_len - 1)
    pad_mask = mask_padding and kv_pad_len != kv_len

    def compute(c, masked):
        k0 = j * bkv + c * bc  # global index of the chunk's first key
        rows = pl.ds(pl.multiple_of(c * bc, bc), bc)
        k = k_ref[rows, :]
        hi = lax.Precision.HIGHEST if k.dtype == f32 else None
        s = lax.dot_general(q, k, _NT_DIMS, preferred_element_type=f32, precision=hi)  # [bq, bc]
        if masked:
            cols = k0 + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            keep = cols < kv_len if pad_mask else None
            if window is not None:
                dist = lax.broadcasted_iota(jnp.int32, s.shape, 0) + i * bq - cols
                keep = _all(keep, dist <= window, dist >= -window)
            s = jnp.where(keep, s, MASK_VALUE)
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128]
        p = jnp.exp2(s - _lanes(m_next, bc))  # in (0, 1], the row max term is exactly 1
        alpha = jnp.exp2(m_prev - m_next)  # rescales what was summed against the old max
        l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        v = v_ref[rows, :]
        if masked and pad_mask:  # past the end: p is 0 there, but 0 x (NaN or Inf left in the buffer) is not
            v = jnp.where(lax.broadcasted_iota(jnp.int32, v.shape, 0) < kv_len - k0, v, jnp.zeros_like(v))
        if pv_f32:
            pv = lax.dot_general(p, v.astype(f32), _NN_DIMS, preferred_element_type=f32,
                                 precision=lax.Precision.HIGHEST)
        else:  # p rounded to v's dtype (bf16: the MXU's native input), accumulated in float32
            pv = lax.dot_general(p.astype(v.dtype), v, _NN_DIMS, preferred_element_type=f32, precision=hi)
        acc_ref[...] = _lanes(alpha, acc_ref.shape[1]) * acc_ref[...] + pv

    # A rolled loop over the chunks of the key block: one copy of the chunk code, so Mosaic holds one chunk's
    # logits and probabilities at a time (unrolled, its VMEM use grew with bkv / bc past vmem_bytes' estimate).
    def chunk(c, carry):
        k0 = j * bkv + c * bc
        k1 = k0 + bc - 1
        # Run a chunk only if it holds a real key some row may see; mask it only if some (row, key) is out.
        live = k0 < kv_len if pad_mask else None
        needs_mask = k1 >= kv_len if pad_mask else None
        if window is not None:
            live = _all(live, k1 >= r0 - window, k0 <= r1 + window)
            needs_mask = _any(needs_mask, jnp.logical_not(jnp.logical_and(k0 >= r1 - window, k1 <= r0 + window)))
        if needs_mask is None and live is None:
            compute(c, masked=False)
        elif needs_mask is None:
            pl.when(live)(functools.partial(compute, c, False))
        else:  # two copies of the chunk code: the unmasked one saves the iota/compare/select per logit
            pl.when(_all(live, needs_mask))(functools.partial(compute, c, True))
            pl.when(_all(live, jnp.logical_not(needs_mask)))(functools.partial(compute, c, False))
        return carry

    lax.fori_loop(0, bkv // bc, chunk, 0)

    @pl.when(j == num_kv_blocks - 1)
    def _finish():
        l = l_ref[...]
        l = jnp.where(l == 0.0, 1.0, l)  # only padded query rows whose every chunk was skipped: output 0
        o_ref[...] = (acc_ref[...] / _lanes(l, acc_ref.shape[1])).astype(o_ref.dtype)


def splash_attention(q, k, v, *, block_sizes: BlockSizes = BlockSizes(), scale: float | None = None,
                     window_size: int | None = None, k_smooth: bool = False, pv_f32: bool = False,
                     interpret: bool | str = False, vmem_limit_bytes: int = VMEM_LIMIT_BYTES,
                     _mask_padding: bool = True) -> jax.Array:
    """softmax(q k^T * scale) v for q [N, L, D], k and v [N, S, D] (float32 or bfloat16); returns [N, L, D]
    in q.dtype.

    scale: defaults to D ** -0.5. window_size W: query i sees key j iff |i - j| <= W (self-attention only);
    key blocks and chunks wholly outside the window are skipped (neither DMA'd nor computed). k_smooth:
    subtract each head's mean key first; exact in real arithmetic, it pays in float32 when keys share a large
    mean (e.g. mean 100: 1.9e-5 -> 4e-7 relative error) and costs one more bf16 rounding of the keys in bf16
    (the logits are accumulated in float32 either way). pv_f32: P.V in float32 instead of the input dtype.
    interpret: run the same kernel in Pallas' TPU interpreter (pltpu.InterpretParams(): TPU memory spaces,
    uninitialised VMEM read as NaN, bounds-checked reads) on CPU; any D and blocks that are multiples of 8
    work there, while compiled kernels need bkv_compute % 128 == 0 and are meant for D = 64 or 128.
    interpret="generic": Pallas' generic interpreter instead (the kernel body as plain jax ops, no TPU
    semantics), for kernels inside a multi-device shard_map: the TPU interpreter holds every kernel call at a
    barrier across the devices, and a DiT step whose queries are split over 8 virtual CPU devices never
    returns from it (tpu_wan.runtime.attention).
    Blocks larger than the (padded) sequence are shrunk to it, so short sequences do not pay for padding;
    blocks whose VMEM (vmem_bytes, after shrinking) exceeds `vmem_limit_bytes` (the chip's, vmem_limit_for) are
    refused, in interpret mode too, so a check on CPU refuses what the TPU could not run. `_mask_padding=False` leaves padded keys
    unmasked, for a test that shows the mask matters.
    """
    _check_inputs(q, k, v, window_size)
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes, found {type(block_sizes).__name__}")
    if scale is not None:
        if not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale == 0:
            raise ValueError(f"scale must be a finite non-zero float or None, found {scale!r}")
        scale = float(scale)
    window_size = None if window_size is None else int(window_size)
    if not interpret:
        check_lanes(block_sizes)
    check_vmem(block_sizes, q.shape[1], k.shape[1], q.shape[2], q.dtype, vmem_limit_bytes)
    return _splash_attention(q, k, v, block_sizes=block_sizes, scale=scale, window_size=window_size,
                             k_smooth=bool(k_smooth), pv_f32=bool(pv_f32),
                             interpret=interpret if interpret == "generic" else bool(interpret),
                             vmem_limit_bytes=int(vmem_limit_bytes), mask_padding=bool(_mask_padding))


@functools.partial(jax.jit, static_argnames=("block_sizes", "scale", "window_size", "k_smooth", "pv_f32",
                                             "interpret", "vmem_limit_bytes", "mask_padding"))
def _splash_attention(q, k, v, *, block_sizes, scale, window_size, k_smooth, pv_f32, interpret, vmem_limit_bytes,
                      mask_padding):
    f32 = jnp.float32
    n, q_len, d = q.shape
    kv_len = k.shape[1]
    logit_scale = (d ** -0.5 if scale is None else scale) * LOG2_E
    if k_smooth:
        # softmax(q (k - kbar)^T) = softmax(q k^T): every logit of a row moves by q . kbar. Centred keys make
        # the logits (and so their float32 rounding before exp2) smaller when keys share a large mean; for
        # bf16 the centred keys are rounded to bf16 once more. The mean is over the true keys (no padding yet).
        k = (k.astype(f32) - jnp.mean(k.astype(f32), axis=1, keepdims=True)).astype(k.dtype)
    # The base-2 scale folded into q once: multiplied in float32, then cast back to q's dtype, so the kernel's
    # logits are already in base 2 and it multiplies nothing per logit. float32: one rounding per element
    # (<= 6e-8 relative). bfloat16: q * scale * log2(e) is rounded to bf16 (<= 2^-9 relative per element), as
    # upstream splash rounds q * scale; where scale is a power of two (D = 64) upstream's product is exact and
    # ours is not, since log2(e) never is. What that costs is measured against upstream (test_splash_kernel).
    q = (q.astype(f32) * f32(logit_scale)).astype(q.dtype)
    blocks = effective_block_sizes(block_sizes, q_len, kv_len)
    bq, bkv, bc = blocks.bq, blocks.bkv, blocks.bkv_compute
    q_pad_len, kv_pad_len = round_up(q_len, bq), round_up(kv_len, bkv)
    if not mask_padding:  # the test-only path: zero keys past the end, left unmasked, to show the mask matters
        k = jnp.pad(k, ((0, 0), (0, kv_pad_len - kv_len), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, kv_pad_len - kv_len), (0, 0)))
    # Lengths that are not block multiples need no padded copies: the last query and key blocks run past the
    # arrays' ends. Rows read there hold whatever the buffer held; the kernel masks those keys (and zeroes their
    # values), and writes to query rows past the end are dropped.
    num_kv_blocks = kv_pad_len // bkv

    def kv_index_map(h, i, j):
        if window_size is None:
            return h, j, 0
        # Key blocks wholly outside the window are skipped by the kernel; pointing their grid steps at a block
        # that is needed anyway (the nearest in-window one) means the pipeline fetches nothing new for them.
        lo = lax.div(jnp.maximum(i * bq - window_size, 0), bkv)
        hi = lax.div(jnp.minimum(jnp.minimum(i * bq + bq - 1, q_len - 1) + window_size, kv_len - 1), bkv)
        return h, jnp.minimum(jnp.maximum(j, lo), hi), 0

    kernel = functools.partial(_kernel, bq=bq, bkv=bkv, bc=bc, q_len=q_len,
                               kv_len=kv_len, kv_pad_len=kv_pad_len, window=window_size,
                               mask_padding=mask_padding, pv_f32=pv_f32)
    pairs = n * attended_pairs(q_len, kv_len, window_size)
    itemsize = jnp.dtype(q.dtype).itemsize
    out = pl.pallas_call(
        kernel,
        grid=(n, q_pad_len // bq, num_kv_blocks),
        in_specs=[pl.BlockSpec((None, bq, d), lambda h, i, j: (h, i, 0)),
                  pl.BlockSpec((None, bkv, d), kv_index_map),
                  pl.BlockSpec((None, bkv, d), kv_index_map)],
        out_specs=pl.BlockSpec((None, bq, d), lambda h, i, j: (h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((n, q_len, d), q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), f32),  # m: running row max (base-2 logits)
                        pltpu.VMEM((bq, NUM_LANES), f32),  # l: running row sum of 2^(s - m)
                        pltpu.VMEM((bq, d), f32)],  # acc: running sum of 2^(s - m) v
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit_bytes),
        cost_estimate=pl.CostEstimate(flops=4 * pairs * d, transcendentals=pairs,
                                      bytes_accessed=(2 * q.size + k.size * (q_pad_len // bq) * 2) * itemsize),
        # Pallas' TPU interpreter follows TPU semantics (memory spaces, NaN-filled uninitialised scratch,
        # bounds-checked reads). The generic interpret=True also runs this kernel in jax 0.10.2 (~1.5x faster
        # on CPU) but knows nothing TPU-specific.
        interpret=True if interpret == "generic" else pltpu.InterpretParams() if interpret else False,
        name="splash_exp2_fwd",
    )(q, k, v)
    return out
