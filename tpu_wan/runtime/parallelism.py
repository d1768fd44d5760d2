"""How the DiT's work is split over the ('dp', 'tp') mesh: the two sharding modes and the choice between them.

Both modes hold the same weight shards (tpu_wan.runtime.mesh.WAN_TRANSFORMER_RULES, split over tp) and put batch rows
(the CFG pair, videos) on dp. They differ in where the hidden state [B L E] lives:

megatron  replicated over tp. Column-parallel q/k/v and FFN-in, row-parallel out and FFN-out: each block ends
          self-attention, cross-attention and the FFN with one all-reduce of the hidden state over tp.
sequence  split on its L tokens over tp (and over dp too when the rows do not divide it). Each block's weights
          are gathered as it runs (they do not depend on the activations, so the gather can run ahead);
          self-attention regroups q, k, v from (tokens/n, all heads) to (all tokens, heads/n) with one
          all-to-all each and the output back (Ulysses), or, where the heads do not divide n, gathers k and v
          whole; cross-attention needs no activation moved (local queries; the text's k and v, 512 tokens,
          on every chip).

The hidden state is pinned to its mode's layout at every block's input and output (sharding constraints); left
alone, XLA's propagation keeps the Megatron residual feature-sharded and re-gathers it before every column-parallel
layer (docs/ARCHITECTURE.md section 5 accounts for every activation-sized collective of both modes).

`--sharding auto`: a compile-only run compiles both modes and keeps the one the TPU compiler says fits and sends
less (tpu_wan.run.aot); a run picks with `choose`, the mode with fewer bytes sent per chip per denoising step by
arithmetic.dit_step_traffic_bytes' closed form, which matches the compiler's count within 0.2% (tested on one
1.3B block for v5e and v6e; every row of bench/README.md's sharding table).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MODES = ("megatron", "sequence")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the DiT's activations live on `mesh` in sharding mode `mode`."""

    mode: str
    mesh: Mesh

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"expected a sharding mode in {MODES}, found {self.mode!r}")

    def batch_axis(self, rows: int) -> str | None:
        """dp when it divides the rows (as mesh.batch_sharding), else None."""
        dp = self.mesh.shape["dp"]
        return "dp" if dp > 1 and rows % dp == 0 else None

    def token_axes(self, rows: int) -> tuple[str, ...]:
        """The mesh axes splitting the L tokens: none in megatron mode; tp, and dp where it holds no rows, in
        sequence mode (axes of size 1 left out)."""
        if self.mode == "megatron":
            return ()
        axes = ("tp",) if self.batch_axis(rows) else ("dp", "tp")
        return tuple(a for a in axes if self.mesh.shape[a] > 1)

    def token_shards(self, rows: int) -> int:
        return math.prod(self.mesh.shape[a] for a in self.token_axes(rows))

    def hidden_spec(self, rows: int) -> P:
        """The PartitionSpec of a [B L E] hidden state."""
        return P(self.batch_axis(rows), self.token_axes(rows) or None, None)

    def constrain_hidden(self, x: jax.Array) -> jax.Array:
        """x [B L E] pinned to this layout."""
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.hidden_spec(x.shape[0])))


LocalAttention = Callable[..., jax.Array]  # (q [b N l D], k [b N s D], v [b N s D], scale) -> [b N l D], one device


def sequence_attention(make_local: Callable[[int, int, int], LocalAttention], layout: Layout, q, k, v, *, scale,
                       self_attention: bool) -> jax.Array:
    """Attention over [B N L D] queries whose tokens are split over the layout's token axes.

    make_local(heads, q_len, kv_len) gives the per-device function for the shapes one device sees. Inside one
    shard_map, self-attention regroups q, k and v from (L/n tokens, all heads) to (all tokens, N/n heads) with
    one all-to-all each and the output back (heads divisible by the n token shards), or gathers k and v whole
    (too few heads); cross-attention runs the local queries against the text's k and v, which every device
    holds. A token count n does not divide is padded at the end: after the all-to-all the padding is cut off
    before the local attention (so a window sees true positions) and put back for the return trip; with k and v
    gathered, padded queries are computed and dropped, padded keys never reach the local attention. (Left to XLA as sharding constraints, the same regrouping compiles for v6e-8 at
    14B 720p into 3 all-to-alls and one gather of a whole q, k or v per block: 57.6 instead of 41.7 GB per
    step.)"""
    b, n, l, d = q.shape
    s = k.shape[2]
    axes, shards, batch = layout.token_axes(b), layout.token_shards(b), layout.batch_axis(b)
    lp = -(-l // shards) * shards
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, lp - x.shape[2]), (0, 0)))  # noqa: E731
    split, whole = P(batch, None, axes, None), P(batch, None, None, None)
    if not self_attention:
        local = make_local(n, lp // shards, s)
        body = lambda q, k, v: local(q, k, v, scale=scale)  # noqa: E731
        return _shard_map(body, layout.mesh, (split, whole, whole), split)(pad(q), k, v)[:, :, :l]
    if n % shards == 0:
        local = make_local(n // shards, l, l)

        def body(q, k, v):  # [b N L/n D] -> [b N/n L D]: all tokens of N/n heads, in their global order
            q, k, v = (jax.lax.all_to_all(x, axes, 1, 2, tiled=True)[:, :, :l] for x in (q, k, v))
            out = local(q, k, v, scale=scale)  # L x L: padding dropped, so a window sees true positions
            out = jnp.pad(out, ((0, 0), (0, 0), (0, lp - l), (0, 0)))
            return jax.lax.all_to_all(out, axes, 2, 1, tiled=True)
    else:
        local = make_local(n, lp // shards, l)

        def body(q, k, v):  # local queries, every key
            k, v = (jax.lax.all_gather(x, axes, axis=2, tiled=True)[:, :, :l] for x in (k, v))
            return local(q, k, v, scale=scale)

    return _shard_map(body, layout.mesh, (split, split, split), split)(pad(q), pad(k), pad(v))[:, :, :l]


def _shard_map(body, mesh: Mesh, in_specs, out_spec):
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)


def choose(dit: dict, rows: int, tokens: int, text_len: int, mesh: Mesh, itemsize: int, guided: bool = True) -> str:
    """The mode with fewer bytes moved per chip per denoising step (megatron on a tie, e.g. one device);
    sequence where tp does not divide the heads, which Megatron splits. For a run that compiles nothing first:
    where a compile is at hand (compile-only runs) the compiler's own counts decide (tpu_wan.run.aot)."""
    from tpu_wan.tpu.arithmetic import dit_step_traffic_bytes

    if dit["num_attention_heads"] % mesh.shape["tp"]:
        return "sequence"
    moved = {mode: dit_step_traffic_bytes(dit, Layout(mode, mesh), rows, tokens, text_len, itemsize, guided)
             for mode in MODES}
    return min(MODES, key=lambda mode: moved[mode])
