"""The one attention entry the models call (through the torchax scaled_dot_product_attention override),
and the only caller of tpu_wan.kernels.

`make_attention(options, mesh)` returns fn(q [B N L D], k [B N S D], v [B N S D], *, scale) -> [B N L D] that
picks, per call, from the shapes it sees at trace time:
  custom  our exp2 splash kernel (Pallas TPU; interpret mode on CPU, for checks)
  splash  upstream jax.experimental.pallas.ops.tpu.splash_attention, the baseline to beat (TPU; interpret on CPU)
  xla     plain softmax attention that XLA fuses and GSPMD partitions (every backend); on one CPU device it
          runs one (batch row, head) at a time, the same numbers (see xla_attention_per_head)
  cudnn   jax.nn.dot_product_attention's cuDNN flash attention (GPU; bf16/fp16, head dim <= 128)
`auto` = custom on TPU (self- and cross-attention), cudnn on GPU where it applies, xla otherwise (CPU).
Kernels see one device's data: shard_map splits the batch over dp,
heads over tp when they divide, and otherwise the query sequence over the axes left (keys stay whole). In the
sequence-parallel layout (tpu_wan.runtime.parallelism) the tokens arrive split, and every choice runs inside
parallelism.sequence_attention (all-to-all to whole sequences of a group of heads, or k/v gathered).
A window (options.window_size) applies to self-attention only, on every choice; whether a call is
self-attention is decided once, from the global shapes (L == S), never from one shard's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tpu_wan.core.config import BLOCK_FLAGS, AttentionOptions  # noqa: F401  (AttentionOptions: callers' one import)
from tpu_wan.core.errors import AttentionError
from tpu_wan.kernels import kernel_tiling
from tpu_wan.runtime import mesh as mesh_lib
from tpu_wan.runtime import parallelism
from tpu_wan.tpu import hlo

AttentionFn = Callable[..., jax.Array]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                  window_size: int | None = None) -> jax.Array:
    """softmax(q k^T * scale) v, with the softmax in float32 whatever the input dtype. window_size W
    (self-attention): query i sees key j iff |i - j| <= W."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bnld,bnsd->bnls", q, k, preferred_element_type=jnp.float32) * scale  # [B N L S]
    if window_size is not None:
        i, j = jnp.arange(q.shape[2])[:, None], jnp.arange(k.shape[2])[None, :]
        logits = jnp.where(jnp.abs(i - j) <= window_size, logits, -jnp.inf)  # the diagonal keeps rows non-empty
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnls,bnsd->bnld", probs, v)  # [B N L D]


def xla_attention_per_head(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                           window_size: int | None = None) -> jax.Array:
    """xla_attention over one (batch row, head) at a time (lax.map): the same ops on each [L S] block, with one
    block of logits live instead of all [B N L S]. On XLA's CPU backend (2 cores) that is faster: [2, 12, 1280, 64]
    self-attention ~270 -> ~225 ms, cross-attention over 512 keys ~100 -> ~82 ms, a medium Wan DiT step (f32,
    bench/dit_step.py) 11% faster. float32 results are bit for bit those of xla_attention. In bfloat16 this form
    rounds P to bf16 before P.V as written (every element equal to a float64 emulation of that), where XLA's CPU
    fusion of the batched form keeps P in f32: rel error vs float64 2.1e-3 instead of 1.6e-3, both within
    KERNEL_BF16_RTOL. Unsharded use only: a loop over a sharded axis would make GSPMD gather it."""
    b, n, l, d = q.shape
    flat = lambda x: x.reshape(b * n, x.shape[2], d)  # noqa: E731

    def one(qkv):
        return xla_attention(*(x[None, None] for x in qkv), scale=scale, window_size=window_size)[0, 0]

    return jax.lax.map(one, (flat(q), flat(k), flat(v))).reshape(b, n, l, d)


def cudnn_attention(q, k, v, *, scale=None, window_size=None):
    """jax.nn.dot_product_attention's cuDNN kernel on [B N L D] arrays (GPU; see cudnn_unsupported)."""
    t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [B N L D] <-> [B L N D]
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v), scale=scale, local_window_size=window_size,
                                          implementation="cudnn"))


def cudnn_unsupported(platform: str, dtype, head_dim: int) -> str | None:
    """Why cudnn_attention cannot serve this call, or None if it can."""
    if platform != "gpu":
        return f"cuDNN attention needs a GPU, found {platform}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN attention needs bfloat16 or float16 inputs, found {jnp.dtype(dtype).name}"
    if head_dim > 128 or head_dim % 8:
        return f"cuDNN attention needs a head dim <= 128 and a multiple of 8, found {head_dim}"
    return None


def pallas_tpu_unsupported(choice: str, platform: str) -> str | None:
    """Why the Pallas TPU kernel `choice` (custom or splash) cannot run on `platform`, or None if it can."""
    if platform == "gpu":
        return f"--attention {choice} is a Pallas TPU kernel: expected tpu (or cpu, interpreted), found gpu"
    return None


def _resolve(options: AttentionOptions, platform: str, kv_len: int, dtype, head_dim: int = 128) -> str:
    choice = options.choice
    if choice in ("custom", "splash") and (why := pallas_tpu_unsupported(choice, platform)):
        raise AttentionError(why)
    if choice == "cudnn" and (why := cudnn_unsupported(platform, dtype, head_dim)):
        raise AttentionError(f"--attention cudnn: {why}")
    if choice != "auto":
        return choice
    if platform == "tpu":
        # Every call, cross-attention over the 512 text tokens included: XLA's einsum-softmax-einsum keeps the
        # float32 [L, S] logits in HBM (compiled for v6e at 14B 720p, 10 heads: 2,953 MiB of temp per call, and
        # 5.0 ms by XLA's cost model), where the kernel needs no temp at all (docs/KERNEL.md).
        return "custom"
    if cudnn_unsupported(platform, dtype, head_dim) is None:
        return "cudnn"  # cuDNN's fused attention takes 16-bit inputs and head dims up to 128
    return "xla"


def _kernel(choice: str, options: AttentionOptions, q_len: int, kv_len: int, head_dim: int, dtype,
            window: int | None, device_kind: str | None, shard_mapped: bool = False):
    """fn(q [N L D], k [N S D], v [N S D], scale) for one device's data. q_len is the local (per-shard) query
    length; `window` was decided by the caller from the global shapes (None for cross-attention). device_kind:
    the TPU chip it compiles for (its VMEM limit), None to run interpreted on the host: in Pallas' TPU
    interpreter on one device, in its generic one inside a multi-device shard_map (`shard_mapped`), where the
    TPU interpreter's cross-device barrier hangs a DiT step on virtual CPU devices (splash_exp2.splash_attention)."""
    from tpu_wan.kernels import splash_exp2

    given = {n: getattr(options, n) for n in ("bq", "bkv", "bkv_compute") if getattr(options, n) is not None}
    flags = ", ".join(f"{BLOCK_FLAGS[n]} {v}" for n, v in given.items())
    interpret = ("generic" if shard_mapped else True) if device_kind is None else False
    vmem_limit = kernel_tiling.VMEM_LIMIT_BYTES if interpret else kernel_tiling.vmem_limit_for(device_kind)
    try:
        defaults = kernel_tiling.default_block_sizes(q_len, kv_len, head_dim, dtype, vmem_limit)
        blocks = dataclasses.replace(defaults, **given)
        if choice == "custom":
            kernel_tiling.check_vmem(blocks, q_len, kv_len, head_dim, dtype, vmem_limit)
            if not interpret:
                kernel_tiling.check_lanes(blocks)
    except ValueError as err:  # a given size that does not combine with a default one, over VMEM or off the lanes
        raise AttentionError(f"kernel block sizes ({flags} with the defaults for q_len={q_len} kv_len={kv_len}): "
                             f"expected {err}") from None
    if choice == "custom":
        return functools.partial(
            splash_exp2.splash_attention, block_sizes=blocks, window_size=window, k_smooth=options.k_smooth,
            interpret=interpret, vmem_limit_bytes=vmem_limit,
        )
    return functools.partial(upstream_splash, block_sizes=blocks, window_size=window, interpret=bool(interpret))


def upstream_block_sizes(block_sizes: kernel_tiling.BlockSizes, q_len: int, kv_len: int) -> kernel_tiling.BlockSizes:
    """The blocks upstream_splash runs for ours: shrunk to the sequence, then rounded up to the multiples of 128
    upstream requires of every block (bkv to a multiple of bkv_compute)."""
    up = lambda x: kernel_tiling.round_up(x, kernel_tiling.NUM_LANES)  # noqa: E731
    bq, bkv = up(min(block_sizes.bq, q_len)), up(min(block_sizes.bkv, kv_len))
    bc = min(up(block_sizes.bkv_compute), bkv)
    return kernel_tiling.BlockSizes(bq, kernel_tiling.round_up(bkv, bc), bc)


def upstream_splash(q, k, v, *, block_sizes: kernel_tiling.BlockSizes, scale: float | None = None,
                    window_size: int | None = None, interpret: bool = False) -> jax.Array:
    """Upstream jax's splash attention on q [N L D], k and v [N S D], called as maxtext calls it (q pre-scaled in
    its own dtype): the baseline our kernel is timed and judged against, at upstream_block_sizes. Lengths that are
    not block multiples are padded, the padding masked with segment ids."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    n, l, d = q.shape
    s = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    blocks = upstream_block_sizes(block_sizes, l, s)
    bq, bkv, bc = blocks.bq, blocks.bkv, blocks.bkv_compute
    lp, sp = kernel_tiling.round_up(l, bq), kernel_tiling.round_up(s, bkv)
    mask = (sm.FullMask((lp, sp)) if window_size is None
            else sm.LocalMask((lp, sp), (window_size, window_size), offset=0))
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([mask] * n),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=sk.BlockSizes(bq, bkv, bc, bq, bkv, bc),
        interpret=interpret,
    )
    q = (q * scale).astype(q.dtype)
    if (lp, sp) == (l, s):  # block multiples: nothing to mask (segment ids would cost a compare per logit)
        return kernel(q, k, v)
    # Padded keys get their own segment, so real queries never attend to them.
    q_seg = (jnp.arange(lp) >= l).astype(jnp.int32)
    kv_seg = (jnp.arange(sp) >= s).astype(jnp.int32)
    pad = lambda x, to: jnp.pad(x, ((0, 0), (0, to - x.shape[1]), (0, 0)))  # noqa: E731
    out = kernel(pad(q, lp), pad(k, sp), pad(v, sp), segment_ids=sk.SegmentIds(q_seg, kv_seg))
    return out[:, :l]


def _per_device(kernel, scale):
    """[B N L D] -> the kernel's [B*N L D]: batch rows and heads are independent, so they share its head axis."""

    def run(q, k, v):
        b, n, l, d = q.shape
        flat = lambda x: x.reshape(b * n, x.shape[2], d)  # noqa: E731
        return kernel(flat(q), flat(k), flat(v), scale=scale).reshape(b, n, l, d)

    return run


def _shard_specs(mesh: Mesh, batch: int, heads: int) -> tuple[P, P, tuple[str, ...]]:
    """(q/out spec, k/v spec, axes splitting the query sequence) for [B N L D] arrays."""
    batch_axis = "dp" if mesh.shape["dp"] > 1 and batch % mesh.shape["dp"] == 0 else None
    head_axis = "tp" if mesh.shape["tp"] > 1 and heads % mesh.shape["tp"] == 0 else None
    seq_axes = tuple(a for a, used in (("dp", batch_axis), ("tp", head_axis)) if used is None and mesh.shape[a] > 1)
    q_spec = P(batch_axis, head_axis, seq_axes or None, None)
    return q_spec, P(batch_axis, head_axis, None, None), seq_axes


def check_calls(fn: AttentionFn, *, batch: int, heads: int, head_dim: int, tokens: int, text_len: int,
                dtype, mesh: Mesh | None = None) -> None:
    """The self-attention (L = S = tokens) and cross-attention (S = text_len) calls of `fn` on abstract inputs,
    before any weight is loaded or anything runs: traced, and on a TPU mesh (a real chip, or a slice compiled for
    with --topology) compiled, so a setting the shapes or the TPU compiler refuse is one line, not a failure
    minutes into loading."""
    compile_for_tpu = mesh is not None and mesh_lib.platform(mesh) == "tpu"
    for kv_len in (tokens, text_len):
        shapes = [(batch, heads, tokens, head_dim), (batch, heads, kv_len, head_dim), (batch, heads, kv_len, head_dim)]
        if not compile_for_tpu:
            jax.eval_shape(fn, *(jax.ShapeDtypeStruct(s, jnp.dtype(dtype)) for s in shapes))  # [B N L D], [B N S D]
            continue
        replicated = NamedSharding(mesh, P())
        args = [jax.ShapeDtypeStruct(s, jnp.dtype(dtype), sharding=replicated) for s in shapes]
        lowered = jax.jit(fn).lower(*args)  # our own refusals (AttentionError) surface here, as on the CPU
        try:
            lowered.compile()
        except Exception as err:  # Mosaic's or XLA's refusal
            if hlo.out_of_memory(err) is not None:
                # the call alone, on replicated inputs, outgrew the HBM: whether the run fits is its own program's
                continue  # verdict (a compile-only row, or exit 3 on a chip), not a kernel refusal
            first = (str(err).strip().splitlines() or [""])[0]
            raise AttentionError(f"the TPU compiler ({mesh.devices.flat[0].device_kind}) refused attention over "
                                 f"{tokens} x {kv_len} tokens: expected it to compile, found {type(err).__name__}: "
                                 f"{first}") from None


def _device_kind(mesh: Mesh | None) -> str:
    """The TPU chip the kernels compile for: the mesh's (abstract devices too), else the default device's."""
    return (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).device_kind


def make_attention(options: AttentionOptions | str = "auto", mesh: Mesh | None = None,
                   platform: str | None = None, layout: parallelism.Layout | None = None) -> AttentionFn:
    """The attention function for `options` on `mesh`; an unsupported choice is an error, never a fallback.
    platform: where it will run (default: the mesh's devices' platform, else jax.default_backend()); "cpu" with
    the inputs on a CPU device runs the Pallas kernels interpreted on the host whatever the default backend is.
    layout: how the model's activations are split (default: Megatron, tokens whole)."""
    if isinstance(options, str):
        options = AttentionOptions(choice=options)
    platform = platform or (mesh_lib.platform(mesh) if mesh is not None else jax.default_backend())

    def attention(q, k, v, *, scale=None):
        b, n, l, d = q.shape
        s = k.shape[2]
        # Self- vs cross-attention from the global shapes, once: a shard's query length may equal S by chance.
        window = options.window_size if l == s else None
        choice = _resolve(options, platform, s, q.dtype, d)
        if choice == "xla":
            if platform == "cpu" and (mesh is None or mesh.size == 1):
                return xla_attention_per_head(q, k, v, scale=scale, window_size=window)
            return xla_attention(q, k, v, scale=scale, window_size=window)
        if choice == "cudnn":
            return cudnn_attention(q, k, v, scale=scale, window_size=window)
        device_kind = _device_kind(mesh) if platform == "tpu" else None  # None: interpreted on the host
        if layout is not None and layout.token_shards(b) > 1:
            if window is not None and n % layout.token_shards(b):
                raise AttentionError(
                    f"window_size with k and v gathered (sequence sharding): expected heads divisible by the "
                    f"{layout.token_shards(b)} token shards, found heads={n}")

            def make_local(heads, q_len, kv_len):
                if choice == "xla":
                    return functools.partial(xla_attention, window_size=window)
                if choice == "cudnn":
                    return functools.partial(cudnn_attention, window_size=window)
                kernel = _kernel(choice, options, q_len, kv_len, d, q.dtype, window, device_kind, shard_mapped=True)
                return lambda q, k, v, *, scale: _per_device(kernel, scale)(q, k, v)

            return parallelism.sequence_attention(make_local, layout, q, k, v, scale=scale,
                                                  self_attention=l == s)
        if mesh is None or mesh.size == 1:
            return _per_device(_kernel(choice, options, l, s, d, q.dtype, window, device_kind), scale)(q, k, v)
        q_spec, kv_spec, seq_axes = _shard_specs(mesh, b, n)
        shards = math.prod(mesh.shape[a] for a in seq_axes)
        if seq_axes and window is not None:
            raise AttentionError(
                f"window_size with the query sequence split over {seq_axes}: expected heads divisible by "
                f"tp={mesh.shape['tp']} and batch by dp={mesh.shape['dp']}, found heads={n} batch={b}"
            )
        lp = -(-l // shards) * shards  # the query sequence splits evenly; padded rows are dropped below
        qp = jnp.pad(q, ((0, 0), (0, 0), (0, lp - l), (0, 0)))
        local = _per_device(_kernel(choice, options, lp // shards, s, d, q.dtype, window, device_kind,
                                    shard_mapped=True), scale)
        out = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)(
            qp, k, v
        )
        return out[:, :, :l]

    return attention
