"""The FLOPs the models' own arithmetic needs (multiply-adds count 2), whatever the partitioning: the yardstick
against which a compiled program's per-device FLOPs show replicated or wasted work (tpu_wan.aot).

DiT and UMT5: closed forms from the config (every matmul, attention's two batched matmuls); the VAE decoder:
its convolutions and matmuls counted in the traced program (a scan counts once per frame).
"""

from __future__ import annotations

import math

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr


def dit_forward_flops(cfg: dict, rows: int, tokens: int, text_len: int) -> int:
    """One WanTransformer3DModel forward over `rows` batch rows of L = `tokens` video tokens and S = `text_len`
    text tokens; `cfg` is transformer/config.json."""
    e = cfg["num_attention_heads"] * cfg["attention_head_dim"]  # E: model dim
    patch = math.prod(cfg["patch_size"])
    L, S = tokens, text_len  # noqa: N806
    self_attn = 4 * 2 * L * e * e + 2 * 2 * L * L * e  # q, k, v, out projections; QK^T and PV
    cross_attn = 2 * 2 * L * e * e + 2 * 2 * S * e * e + 2 * 2 * L * S * e  # q, out; k, v of the text; QK^T, PV
    ffn = 2 * 2 * L * e * cfg["ffn_dim"]
    blocks = cfg["num_layers"] * (self_attn + cross_attn + ffn)
    embed = 2 * L * cfg["in_channels"] * patch * e + 2 * L * e * cfg["out_channels"] * patch  # patchify, proj_out
    conditions = 2 * S * (cfg["text_dim"] * e + e * e) + 2 * (cfg["freq_dim"] * e + e * e) + 2 * e * 6 * e
    return rows * (blocks + embed + conditions)


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
