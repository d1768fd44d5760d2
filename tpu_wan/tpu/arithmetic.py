"""The FLOPs the models' own arithmetic needs (multiply-adds count 2), whatever the partitioning: the yardstick
against which a compiled program's per-device FLOPs show replicated or wasted work (tpu_wan.run.aot).

DiT and UMT5: closed forms from the config (every matmul, attention's two batched matmuls); the VAE decoder:
its convolutions and matmuls counted in the traced program (a scan counts once per frame).
"""

from __future__ import annotations

import math

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr


def dit_forward_flops(cfg: dict, rows: int, tokens: int, text_len: int, image_tokens: int = 0) -> int:
    """One WanTransformer3DModel forward over `rows` batch rows of L = `tokens` video tokens and S = `text_len`
    text tokens (and I = `image_tokens` CLIP tokens: Wan 2.1 I2V's image embedder and second cross-attention);
    `cfg` is transformer/config.json."""
    e = cfg["num_attention_heads"] * cfg["attention_head_dim"]  # E: model dim
    patch = math.prod(cfg["patch_size"])
    L, S = tokens, text_len  # noqa: N806
    self_attn = 4 * 2 * L * e * e + 2 * 2 * L * L * e  # q, k, v, out projections; QK^T and PV
    cross_attn = 2 * 2 * L * e * e + 2 * 2 * S * e * e + 2 * 2 * L * S * e  # q, out; k, v of the text; QK^T, PV
    ffn = 2 * 2 * L * e * cfg["ffn_dim"]
    blocks = cfg["num_layers"] * (self_attn + cross_attn + ffn)
    embed = 2 * L * cfg["in_channels"] * patch * e + 2 * L * e * cfg["out_channels"] * patch  # patchify, proj_out
    conditions = 2 * S * (cfg["text_dim"] * e + e * e) + 2 * (cfg["freq_dim"] * e + e * e) + 2 * e * 6 * e
    if image_tokens:
        i, d = image_tokens, cfg["image_dim"]
        blocks += cfg["num_layers"] * (2 * 2 * i * e * e + 2 * 2 * L * i * e)  # k, v of the image; QK^T, PV
        conditions += 2 * i * (d * d + d * e)  # the image embedder's feed-forward: image_dim -> image_dim -> E
    return rows * (blocks + embed + conditions)


def ring_bytes(kind: str, size: int, n: int) -> float:
    """Bytes one of `n` devices sends in a ring collective over an array of `size` bytes (the operand for
    all-reduce and all-to-all, the gathered result for all-gather), as tpu_wan.tpu.hlo counts `traffic_bytes`."""
    if n <= 1:
        return 0.0
    return (2 if kind == "all-reduce" else 1) * (n - 1) / n * size


def dit_step_traffic_bytes(cfg: dict, layout, rows: int, tokens: int, text_len: int, itemsize: int,
                           guided: bool = True) -> float:
    """Bytes each chip sends in one denoising step (`rows` batch rows, the CFG pairs included when `guided`)
    under `layout` (a tpu_wan.runtime.parallelism.Layout), every collective that grows with the tokens or the weights:
    per block the activation-sized ones and the weight gathers (docs/ARCHITECTURE.md section 5 lists them), and
    once per step the patch embedding's and the output projection's, the text embedder's, and the guidance
    combine's where dp splits the cond and uncond rows. Checked against the TPU compiler's own count
    (tests/test_compile_only.py, bench/sharding_compile.py)."""
    mesh = layout.mesh
    dp, tp = mesh.shape["dp"], mesh.shape["tp"]
    e, ffn, layers = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    patch = math.prod(cfg["patch_size"])
    b = rows // dp if layout.batch_axis(rows) else rows  # rows on one chip
    hidden = b * tokens * e * itemsize  # one [b L E] hidden state
    text = b * text_len * e * itemsize
    out = b * tokens * cfg["out_channels"] * patch * itemsize  # proj_out's [b L C pF pH pW], before unpatchify
    step = ring_bytes("all-reduce", text, tp)  # the text embedder's output, its last layer split over tp
    if guided and layout.batch_axis(rows):
        # cond and uncond rows on different dp shards: XLA sums three float32 latent-sized arrays over dp to
        # combine them (the guided velocity and the UniPC state it feeds), and permutes the bf16 latents twice
        # (the pair built from one latent, and back)
        latents = rows // 2 * tokens * cfg["in_channels"] * patch
        step += 3 * ring_bytes("all-reduce", latents * 4, dp) + 2 * latents * itemsize
    if layout.mode == "megatron":
        # three all-reduces of the hidden state per block (after self-attention, cross-attention, FFN), the q/k
        # RMS-norm statistics (f32 per token: self q, k; cross q); once the patch embedding's output gathered
        # from its channel shards and proj_out's all-reduced
        per_block = 3 * ring_bytes("all-reduce", hidden, tp) + 3 * ring_bytes("all-reduce", b * tokens * 4, tp)
        return layers * per_block + step + ring_bytes("all-gather", hidden, tp) + ring_bytes("all-reduce", out, tp)
    n = layout.token_shards(rows)
    projections = ring_bytes("all-gather", 6 * e * e * itemsize, tp)  # self q k v out, cross q out
    # The FFN either gathers its two weights or, where that is cheaper (few tokens), leaves them split and moves
    # the activations instead: the hidden state gathered whole, the partial outputs all-reduced. XLA picks the
    # cheaper (compiled: weights gathered from ~9,000 tokens per row up at 1.3B, activations moved below).
    ffn_moves = min(ring_bytes("all-gather", 2 * e * ffn * itemsize, tp),
                    ring_bytes("all-gather", hidden, n) + ring_bytes("all-reduce", hidden, n))
    attention = (4 * ring_bytes("all-to-all", hidden // n, n) if cfg["num_attention_heads"] % n == 0
                 else 2 * ring_bytes("all-gather", hidden, n))
    cross_kv = 2 * ring_bytes("all-gather", text, tp)  # the text's k and v, projected on feature shards
    # once: the patch embedding's output regrouped from channel to token shards, proj_out's output gathered
    step += ring_bytes("all-to-all", hidden // n, n) + ring_bytes("all-gather", out, tp)
    return layers * (projections + ffn_moves + attention + cross_kv) + step


def umt5_encoder_flops(cfg: dict, rows: int, seq_len: int) -> int:
    """One UMT5 encoder forward over `rows` texts of `seq_len` tokens; `cfg` is text_encoder/config.json
    (gated FFN: wi_0, wi_1, wo)."""
    d, inner, S = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], seq_len  # noqa: N806
    attention = 4 * 2 * S * d * inner + 2 * 2 * S * S * inner
    ffn = 3 * 2 * S * d * cfg["d_ff"]
    return rows * cfg["num_layers"] * (attention + ffn)


def traced_flops(fn, *args) -> int:
    """FLOPs of the dot_general and conv_general_dilated ops of `fn` traced at `args` (abstract values do);
    scan bodies count `length` times, cond branches as the largest one."""
    return _count(jax.make_jaxpr(fn)(*args).jaxpr)


def _count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = math.prod(eqn.outvars[0].aval.shape)
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            total += 2 * out * math.prod(eqn.invars[0].aval.shape[i] for i in contract)
        elif name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape  # [O I/groups *spatial] in the rhs spec's order
            out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2 * out * (math.prod(kernel) // out_features)
        subs = [_count(j) for j in _subjaxprs(eqn.params)]
        if subs:
            total += (eqn.params["length"] if name == "scan" else 1) * (max(subs) if name == "cond" else sum(subs))
    return total


def _subjaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, Jaxpr):
                yield item
