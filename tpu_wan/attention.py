"""The one attention entry the models call (through the torchax scaled_dot_product_attention override).

`make_attention(choice)` returns a function (q [B N L D], k [B N S D], v [B N S D], *, scale) -> [B N L D]
on jax arrays. The XLA path is plain softmax attention that XLA fuses and GSPMD partitions along the
shardings of its inputs (batch on dp, heads on tp), on every backend.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from tpu_wan.config import ATTENTION_CHOICES

AttentionFn = Callable[..., jax.Array]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale) v, with the softmax in float32 whatever the input dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bnld,bnsd->bnls", q, k, preferred_element_type=jnp.float32) * scale  # [B N L S]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnls,bnsd->bnld", probs, v)  # [B N L D]


def make_attention(choice: str = "auto") -> AttentionFn:
    """The attention function for `choice`; an unknown choice is an error, never a silent fallback."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, found {choice!r}")
    return xla_attention
