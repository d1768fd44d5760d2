"""Checking and tuning the attention kernels: accuracy against a float64 host reference, timing, block sweeps.

Everything runs through attention.make_attention on one device, so what is checked and timed is exactly what
the models call. On a machine without a TPU the Pallas kernels run in interpret mode: right for `check`,
meaningless for speed (results then say interpret=True).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tpu_wan import attention
from tpu_wan.attention import AttentionOptions

# Dense bf16 matmul peak per chip, TFLOP/s, by jax device_kind prefix (vendor spec sheets).
PEAK_TFLOPS = {
    "TPU v6": 918.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0,
    "NVIDIA H200": 989.0, "NVIDIA H100": 989.0, "NVIDIA A100": 312.0,
}


@dataclasses.dataclass(frozen=True)
class Shape:
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str = "bfloat16"

    def flops(self) -> float:
        return 4.0 * self.heads * self.q_len * self.kv_len * self.head_dim  # two matmuls, 2 flops per MAC


def random_inputs(shape: Shape, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [1 N L D], k and v [1 N S D], standard normal, in the shape's dtype."""
    rng = np.random.default_rng(seed)
    dims = [(1, shape.heads, n, shape.head_dim) for n in (shape.q_len, shape.kv_len, shape.kv_len)]
    return tuple(jnp.asarray(rng.standard_normal(d, dtype=np.float32), shape.dtype) for d in dims)


def reference_f64(q, k, v, window_size: int | None = None) -> np.ndarray:
    """Softmax attention in float64 on the host, the ground truth for `check`."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bnld,bnsd->bnls", q, k) / np.sqrt(q.shape[-1])
    if window_size is not None:
        i, j = np.arange(q.shape[2])[:, None], np.arange(k.shape[2])[None, :]
        logits = np.where(np.abs(i - j) <= window_size, logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return np.einsum("bnls,bnsd->bnld", p / p.sum(-1, keepdims=True), v)


def check(shape: Shape, options: AttentionOptions, seed: int = 0) -> dict:
    """Kernel output vs the float64 reference: max_abs_err and rel_err (Frobenius norm ratio)."""
    if options.window_size is not None and shape.q_len != shape.kv_len:
        raise attention.AttentionError(
            f"window_size is for self-attention: expected q_len == kv_len, found {shape.q_len} != {shape.kv_len}"
        )
    from tpu_wan.kernels.splash_exp2 import default_block_sizes

    blocks = default_block_sizes(shape.q_len, shape.kv_len, shape.head_dim, shape.dtype)
    given = {n: getattr(options, n) for n in ("bq", "bkv", "bkv_compute") if getattr(options, n) is not None}
    try:
        blocks = dataclasses.replace(blocks, **given)
    except ValueError as err:  # a given size that does not combine with the others
        raise attention.AttentionError(f"block sizes for q_len={shape.q_len} kv_len={shape.kv_len}: {err}") from None
    q, k, v = random_inputs(shape, seed)
    out = np.asarray(jax.jit(attention.make_attention(options))(q, k, v), np.float64)
    ref = reference_f64(q, k, v, options.window_size if shape.q_len == shape.kv_len else None)
    return {
        **dataclasses.asdict(shape), "attention": options.choice, "k_smooth": options.k_smooth,
        "window_size": options.window_size, "block_sizes": [blocks.bq, blocks.bkv, blocks.bkv_compute],
        "interpret": jax.default_backend() != "tpu",
        "max_abs_err": float(np.abs(out - ref).max()),
        "rel_err": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
    }


def time_call(fn, args, repeats: int) -> float:
    """Median wall seconds of `repeats` calls after one compile-and-run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_tflops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if kind.startswith(k)), None)


def bench(shape: Shape, options: AttentionOptions, choices=("custom", "splash", "xla"), repeats: int = 5) -> list[dict]:
    """Median time, TFLOP/s and fraction of peak for each attention choice on the same inputs."""
    args = random_inputs(shape)
    peak = peak_tflops()
    rows = []
    for choice in choices:
        fn = jax.jit(attention.make_attention(dataclasses.replace(options, choice=choice)))
        seconds = time_call(fn, args, repeats)
        tflops = shape.flops() / seconds / 1e12
        rows.append({
            "attention": choice, "seconds": seconds, "tflops": tflops,
            "fraction_of_peak": None if peak is None else tflops / peak,
            "interpret": choice != "xla" and jax.default_backend() != "tpu",
        })
    return rows


def sweep(shape: Shape, options: AttentionOptions, candidates, repeats: int = 3) -> list[dict]:
    """Times the custom kernel for each (bq, bkv, bkv_compute); fastest first. Invalid combos are skipped."""
    from tpu_wan.kernels.splash_exp2 import VMEM_LIMIT_BYTES, BlockSizes, vmem_bytes

    args = random_inputs(shape)
    rows = []
    for bq, bkv, bc in candidates:
        try:
            blocks = BlockSizes(bq, bkv, bc)
        except ValueError:
            continue
        if vmem_bytes(blocks, shape.head_dim, shape.dtype) > VMEM_LIMIT_BYTES:
            continue
        opts = dataclasses.replace(options, choice="custom", bq=bq, bkv=bkv, bkv_compute=bc)
        seconds = time_call(jax.jit(attention.make_attention(opts)), args, repeats)
        rows.append({"bq": bq, "bkv": bkv, "bkv_compute": bc, "seconds": seconds,
                     "tflops": shape.flops() / seconds / 1e12})
    return sorted(rows, key=lambda r: r["seconds"])
