"""Checking and tuning the attention kernels: accuracy against a float64 host reference, timing, block sweeps.

Everything runs through attention.make_attention on one device, so what is checked and timed is exactly what
the models call. `check` runs the Pallas kernels compiled on a TPU and, anywhere else (GPU included), in
interpret mode on the host CPU backend. `bench` times what the present backend can run (TPU: custom, splash,
xla; GPU: xla, cudnn; CPU: custom and splash interpreted, meaningless for speed, and xla) and lists what it
skipped and why. `sweep` times the custom kernel's block sizes (TPU; interpreted on CPU).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tpu_wan.kernels import kernel_tiling
from tpu_wan.runtime import attention
from tpu_wan.runtime.attention import AttentionError, AttentionOptions

BENCH_CHOICES = ("custom", "splash", "xla", "cudnn")
# Dense bf16 matmul peak per chip, TFLOP/s (vendor spec sheets), by what jax's device_kind starts with; the
# longest match wins ("TPU v5" is v5p, "TPU v5 lite" v5e; GPUs add their memory: "NVIDIA H100 80GB HBM3").
PEAK_TFLOPS = {
    "TPU v6 lite": 918.0, "TPU v5": 459.0, "TPU v5 lite": 197.0, "TPU v4": 275.0,
    "NVIDIA H200": 989.0, "NVIDIA H100": 989.0, "NVIDIA A100": 312.0,
}


@dataclasses.dataclass(frozen=True)
class Shape:
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str = "bfloat16"

    def flops(self, window_size: int | None = None) -> float:
        """Two matmuls (2 flops per multiply-add) over the (query, key) pairs attended: all of them, or with a
        window those with |i - j| <= window_size."""
        pairs = kernel_tiling.attended_pairs(self.q_len, self.kv_len, self.window(window_size))
        return 4.0 * self.heads * pairs * self.head_dim

    def window(self, window_size: int | None) -> int | None:
        """The window that applies at this shape: a window is for self-attention; on cross-attention it is
        refused (AttentionError), as the kernel refuses it."""
        if window_size is not None and self.q_len != self.kv_len:
            raise AttentionError(f"window_size is for self-attention: expected q_len == kv_len, found "
                                 f"{self.q_len} != {self.kv_len}")
        return window_size


def random_inputs(shape: Shape, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [1 N L D], k and v [1 N S D], standard normal, in the shape's dtype."""
    rng = np.random.default_rng(seed)
    dims = [(1, shape.heads, n, shape.head_dim) for n in (shape.q_len, shape.kv_len, shape.kv_len)]
    return tuple(jnp.asarray(rng.standard_normal(d, dtype=np.float32), shape.dtype) for d in dims)


def reference_f64(q, k, v, *, scale: float | None = None, window_size: int | None = None,
                  round_p: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Softmax attention in float64 on the host over q [... L D], k and v [... S D]: the ground truth for `check`
    and the kernel tests. round_p: applied to P = exp(s - rowmax) before P.V, normalised by the sum of the
    unrounded P (a kernel that rounds P for its P.V matmul, emulated)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("...ld,...sd->...ls", q, k) * scale
    if window_size is not None:
        i, j = np.arange(q.shape[-2])[:, None], np.arange(k.shape[-2])[None, :]
        logits = np.where(np.abs(i - j) <= window_size, logits, -np.inf)  # the diagonal keeps rows non-empty
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("...ls,...sd->...ld", p if round_p is None else round_p(p), v) / p.sum(-1, keepdims=True)


def _host_cpu():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError as err:
        raise AttentionError("without a TPU, check runs the kernel interpreted on the host CPU backend: expected "
                             f"a cpu backend (JAX_PLATFORMS must include cpu), found {err}") from None


def block_sizes(shape: Shape, options: AttentionOptions,
                vmem_limit: int = kernel_tiling.VMEM_LIMIT_BYTES) -> kernel_tiling.BlockSizes:
    """The kernel's block sizes at `shape` for a chip with `vmem_limit`: the per-shape defaults with the given
    ones over them."""
    blocks = kernel_tiling.default_block_sizes(shape.q_len, shape.kv_len, shape.head_dim, shape.dtype, vmem_limit)
    given = {n: getattr(options, n) for n in ("bq", "bkv", "bkv_compute") if getattr(options, n) is not None}
    try:
        return dataclasses.replace(blocks, **given)
    except ValueError as err:  # a given size that does not combine with the others
        raise AttentionError(f"block sizes for q_len={shape.q_len} kv_len={shape.kv_len}: {err}") from None


def compile_for(shape: Shape, options: AttentionOptions, topology: str) -> dict:
    """The kernel `options.choice` (custom: ours; splash: upstream's) compiled for one chip of a TPU slice
    (tpu_wan.tpu.topology: no TPU needed) at `shape`, through the same attention.make_attention the models call:
    compile seconds, XLA's memory and cost analysis, and whether Mosaic accepted it ("error": its first line, if
    not). The VMEM estimate and limit are our kernel's (None for upstream's, which sets its own)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tpu_wan.runtime.mesh import make_mesh
    from tpu_wan.tpu.topology import parse_target

    if options.choice not in ("custom", "splash"):
        raise AttentionError(f"compile: expected the kernel custom or splash, found {options.choice!r}")
    target = parse_target(topology)
    shape.window(options.window_size)
    limit = kernel_tiling.vmem_limit_for(target.generation.device_kind)
    blocks = kernel_tiling.effective_block_sizes(block_sizes(shape, options, limit), shape.q_len, shape.kv_len)
    ours = options.choice == "custom"
    if not ours:
        blocks = attention.upstream_block_sizes(blocks, shape.q_len, shape.kv_len)
    mesh = make_mesh(1, 1, target.devices()[:1])
    fn = attention.make_attention(options, mesh)  # the mesh's platform is tpu: the compiled kernel
    dims = [(1, shape.heads, n, shape.head_dim) for n in (shape.q_len, shape.kv_len, shape.kv_len)]
    args = [jax.ShapeDtypeStruct(d, jnp.dtype(shape.dtype), sharding=NamedSharding(mesh, P())) for d in dims]
    result = {
        "topology": target.name, "device_kind": target.generation.device_kind, **dataclasses.asdict(shape),
        "window_size": options.window_size, "k_smooth": options.k_smooth,
        "block_sizes": [blocks.bq, blocks.bkv, blocks.bkv_compute],
        "attention": options.choice,
        "vmem_bytes": kernel_tiling.vmem_bytes(blocks, shape.head_dim, shape.dtype) if ours else None,
        "vmem_limit_bytes": limit if ours else None,
        "grid_steps_per_head": kernel_tiling.grid_steps(blocks, shape.q_len, shape.kv_len),
    }
    start = time.perf_counter()
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as err:  # Mosaic's or XLA's refusal, reported rather than raised
        text = str(err).strip()
        return {**result, "accepted": False, "compile_s": time.perf_counter() - start,
                "error": f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"}
    from tpu_wan.tpu import hlo

    numbers = hlo.program_numbers(compiled)
    return {**result, "accepted": True, "compile_s": time.perf_counter() - start, "error": None,
            **{k: numbers[k] for k in ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes",
                                       "flops")},
            "attention_flops": shape.flops(options.window_size),
            "custom_calls": hlo.summarize(compiled.as_text())["custom_calls"]}


# Ops counted in Mosaic's final LLO for one grid step (one bq x bkv key block): the vector unit's multiplies,
# the two exponentials (exp2 lowers to vpow2, exp to vexp), adds, subtracts and maxima, and the MXU's matmul
# pushes (vmatmul: a float32 matmul takes several bf16 passes).
LLO_OPS = ("vmul", "vpow2", "vexp", "vadd", "vsub", "vmax", "vmatmul")
LLO_DUMP_FLAG = "--xla_mosaic_dump_to"


def llo_stats(dump_dir) -> dict:
    """Counts of LLO_OPS in the kernel's final LLO, from a folder Mosaic dumped into (LIBTPU_INIT_ARGS has
    LLO_DUMP_FLAG=<folder> before libtpu starts): the largest post-finalize-llo file, the kernel's body."""
    import re
    from pathlib import Path

    dumps = sorted(Path(dump_dir).glob("*post-finalize-llo.txt"), key=lambda p: p.stat().st_size)
    if not dumps:
        raise AttentionError(f"llo stats: expected Mosaic's LLO dumps in {dump_dir}, found none (libtpu started "
                             f"before {LLO_DUMP_FLAG} was set?)")
    text = dumps[-1].read_text()
    return {op: len(re.findall(rf"\bllo\.{op}\b", text)) for op in LLO_OPS}


def check(shape: Shape, options: AttentionOptions, seed: int = 0, repeats: int = 1) -> dict:
    """Kernel output vs the float64 reference on `repeats` random inputs, seeded seed, seed + 1, ...: the worst
    max_abs_err and rel_err (Frobenius norm ratio) over them, and worst_seed, the seed of the worst rel_err
    (check it alone with that seed and repeats=1). Compiled on a TPU; elsewhere (CPU or GPU default backend)
    interpreted on the host CPU."""
    if repeats < 1:
        raise AttentionError(f"check: expected repeats >= 1, found {repeats}")
    window = shape.window(options.window_size)
    platform = "tpu" if jax.default_backend() == "tpu" else "cpu"
    device = jax.devices()[0] if platform == "tpu" else _host_cpu()
    blocks = block_sizes(shape, options, kernel_tiling.vmem_limit_for(device.device_kind) if platform == "tpu"
                         else kernel_tiling.VMEM_LIMIT_BYTES)
    fn = jax.jit(attention.make_attention(options, platform=platform))  # compiled once, for every input
    errors = []  # (rel_err, max_abs_err, seed) of each input
    for s in range(seed, seed + repeats):
        q, k, v = jax.device_put(random_inputs(shape, s), device)
        with jax.default_device(device):
            out = np.asarray(fn(q, k, v), np.float64)
        ref = reference_f64(q, k, v, window_size=window)
        errors.append((float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), float(np.abs(out - ref).max()), s))
    rel_err, _, worst_seed = max(errors)
    return {
        **dataclasses.asdict(shape), "attention": options.choice, "k_smooth": options.k_smooth,
        "window_size": options.window_size, "block_sizes": [blocks.bq, blocks.bkv, blocks.bkv_compute],
        "interpret": platform != "tpu", "seed": seed, "repeats": repeats,
        "max_abs_err": max(e[1] for e in errors), "rel_err": rel_err, "worst_seed": worst_seed,
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


def peak_tflops(device_kind: str | None = None) -> float | None:
    """The chip's dense bf16 peak (default: the first device's), None where it is not known."""
    kind = jax.devices()[0].device_kind if device_kind is None else device_kind
    matches = [k for k in PEAK_TFLOPS if kind.startswith(k)]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def unsupported(choice: str, shape: Shape, platform: str) -> str | None:
    """Why `choice` cannot run at `shape` on `platform`, or None if it can."""
    if choice in ("custom", "splash"):
        return attention.pallas_tpu_unsupported(choice, platform)
    if choice == "cudnn":
        return attention.cudnn_unsupported(platform, shape.dtype, shape.head_dim)
    if choice != "xla":
        return f"unknown attention {choice!r}: expected one of {BENCH_CHOICES}"
    return None


def bench(shape: Shape, options: AttentionOptions, choices=BENCH_CHOICES, repeats: int = 5,
          seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(rows, skipped): median time, TFLOP/s and fraction of peak for each of `choices` the present backend can
    run, on the same inputs (random_inputs(shape, seed)); skipped: {"attention", "reason"} for the others.
    Nothing runnable is an error."""
    platform = jax.default_backend()
    window = shape.window(options.window_size)
    skipped = [{"attention": c, "reason": why} for c in choices if (why := unsupported(c, shape, platform))]
    runnable = [c for c in choices if c not in {r["attention"] for r in skipped}]
    if not runnable:
        raise AttentionError(f"bench: nothing to time on {platform}: "
                             + "; ".join(f"{r['attention']}: {r['reason']}" for r in skipped))
    args = random_inputs(shape, seed)
    peak = peak_tflops()
    flops = shape.flops(window)
    rows = []
    for choice in runnable:
        fn = attention.make_attention(options.for_choice(choice))
        seconds = time_call(jax.jit(fn), args, repeats)
        tflops = flops / seconds / 1e12
        rows.append({
            "attention": choice, "seconds": seconds, "tflops": tflops,
            "fraction_of_peak": None if peak is None else tflops / peak,
            "interpret": choice in ("custom", "splash") and platform != "tpu",
        })
    return rows, skipped


def sweep(shape: Shape, options: AttentionOptions, candidates, repeats: int = 3,
          seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(rows, refused): the custom kernel timed for each (bq, bkv, bkv_compute) on random_inputs(shape, seed),
    fastest first; refused: {"bq", "bkv", "bkv_compute", "reason"} for each candidate that is invalid, over the
    chip's VMEM limit or that the compiler refuses (the sweep goes on past it). None timed is an error."""
    platform = jax.default_backend()
    if why := attention.pallas_tpu_unsupported("custom", platform):
        raise AttentionError(f"sweep times the custom kernel: {why}")
    window = shape.window(options.window_size)
    args = random_inputs(shape, seed)
    flops = shape.flops(window)
    rows, refused = [], []
    for bq, bkv, bc in candidates:
        try:
            opts = dataclasses.replace(options, choice="custom", bq=bq, bkv=bkv, bkv_compute=bc)
            seconds = time_call(jax.jit(attention.make_attention(opts)), args, repeats)
        except (AttentionError, ValueError, jax.errors.JaxRuntimeError) as err:  # ours, or Mosaic's refusal
            reason = " ".join(str(err).split("\n")[0].split())
            refused.append({"bq": bq, "bkv": bkv, "bkv_compute": bc, "reason": reason})
            continue
        rows.append({"bq": bq, "bkv": bkv, "bkv_compute": bc, "seconds": seconds, "tflops": flops / seconds / 1e12})
    if not rows:
        first = refused[0] if refused else None
        raise AttentionError(f"sweep: none of the {len(refused)} candidate block sizes fits; first refusal "
                             + (f"({first['bq']}, {first['bkv']}, {first['bkv_compute']}): {first['reason']}"
                                if first else "(no candidates given)"))
    return sorted(rows, key=lambda r: r["seconds"]), refused
