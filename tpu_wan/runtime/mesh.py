"""The 2D ('dp', 'tp') device mesh and the weight sharding rules, as data.

dp carries independent batch rows (the CFG pair, prompts x seeds); tp carries Megatron-style weight sharding:
column-parallel layers split their output features, row-parallel layers their input features, so a
column -> row pair (q/k/v -> out, FFN in -> FFN out) needs one reduction. Weights are stored in torch layout
(Linear weight [out, in]), so column-parallel is P('tp', None) and row-parallel is P(None, 'tp').
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tpu_wan.core.errors import MeshError

AXES = ("dp", "tp")
COLUMN = P("tp", None)  # split output features
ROW = P(None, "tp")  # split input features
SPLIT = P("tp")  # a bias or norm scale that follows a column-parallel output
REPLICATED = P()
LAYER = "*"  # the layer index in a stacked family's name: "blocks.*.ffn.net.2.weight" is [L, ...]

# (regex over the parameter name, spec). First match wins; unmatched parameters are replicated, and
# tests/test_sharding.py fails if a large one is left unmatched (replicating it must be a rule of its own).
WAN_TRANSFORMER_RULES: tuple[tuple[str, P], ...] = (
    (r"blocks\.\d+\.attn[12]\.to_[qkv]\.weight$", COLUMN),
    (r"blocks\.\d+\.attn[12]\.to_[qkv]\.bias$", SPLIT),
    (r"blocks\.\d+\.attn[12]\.norm_[qk]\.weight$", SPLIT),
    (r"blocks\.\d+\.attn[12]\.to_out\.0\.weight$", ROW),
    # image to video (Wan 2.1 I2V): the image keys' and values' own projections, split by heads as the text's
    (r"blocks\.\d+\.attn2\.add_[kv]_proj\.weight$", COLUMN),
    (r"blocks\.\d+\.attn2\.add_[kv]_proj\.bias$", SPLIT),
    (r"blocks\.\d+\.attn2\.norm_added_k\.weight$", SPLIT),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.weight$", COLUMN),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.bias$", SPLIT),
    (r"condition_embedder\.image_embedder\.ff\.net\.2\.weight$", ROW),
    (r"blocks\.\d+\.ffn\.net\.0\.proj\.weight$", COLUMN),
    (r"blocks\.\d+\.ffn\.net\.0\.proj\.bias$", SPLIT),
    (r"blocks\.\d+\.ffn\.net\.2\.weight$", ROW),
    (r"condition_embedder\.(time|text)_embedder\.linear_1\.weight$", COLUMN),
    (r"condition_embedder\.(time|text)_embedder\.linear_1\.bias$", SPLIT),
    (r"condition_embedder\.(time|text)_embedder\.linear_2\.weight$", ROW),
    # [6E, E]: the six modulation vectors are sliced out of its output, so splitting that output would cut
    # across them (GSPMD then re-gathers it whole); splitting the input keeps the output whole after one psum.
    (r"condition_embedder\.time_proj\.weight$", ROW),
    (r"patch_embedding\.weight$", P("tp", None, None, None, None)),
    (r"patch_embedding\.bias$", SPLIT),
    (r"proj_out\.weight$", ROW),
    (r"rope\.freqs_(cos|sin)$", REPLICATED),  # position tables every shard indexes in full
)

CLIP_RULES: tuple[tuple[str, P], ...] = (
    # ViT-H/14's patch and position embeddings: 0.75M and 0.33M elements, whose outputs feed the whole hidden state
    # into the first layer norm; replicated
    (r"embeddings\.(patch|position)_embedding\.weight$", REPLICATED),
    (r"self_attn\.(q|k|v)_proj\.weight$", COLUMN),
    (r"self_attn\.(q|k|v)_proj\.bias$", SPLIT),
    (r"self_attn\.out_proj\.weight$", ROW),
    (r"mlp\.fc1\.weight$", COLUMN),
    (r"mlp\.fc1\.bias$", SPLIT),
    (r"mlp\.fc2\.weight$", ROW),
)
UMT5_RULES: tuple[tuple[str, P], ...] = (
    (r"(shared|embed_tokens)\.weight$", ROW),  # [vocab, d_model]: split d_model, lookups stay local
    (r"SelfAttention\.[qkv]\.weight$", COLUMN),
    (r"SelfAttention\.o\.weight$", ROW),
    (r"SelfAttention\.relative_attention_bias\.weight$", ROW),  # [buckets, heads]
    (r"DenseReluDense\.wi(_0|_1)?\.weight$", COLUMN),
    (r"DenseReluDense\.wo\.weight$", ROW),
)


def default_mesh_shape(num_devices: int) -> tuple[int, int]:
    """dp=2 when the device count is even (the CFG pair runs in parallel), the rest on tp."""
    dp = 2 if num_devices % 2 == 0 else 1
    return dp, num_devices // dp


def make_mesh(dp: int | None = None, tp: int | None = None, devices: Sequence | None = None) -> Mesh:
    """A ('dp', 'tp') mesh over `devices` (default: all). Missing sizes are derived from the device count."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    given = " ".join(f"--{name} {value}" for name, value in (("dp", dp), ("tp", tp)) if value is not None)
    if dp is None and tp is None:
        dp, tp = default_mesh_shape(n)
    elif dp is None:
        dp = n // tp if tp and n % tp == 0 else -1
    elif tp is None:
        tp = n // dp if dp and n % dp == 0 else -1
    if dp < 1 or tp < 1 or dp * tp != n:
        raise MeshError(f"dp x tp must equal the {n} available devices, found dp={dp} tp={tp}" if dp > 0 and tp > 0
                        else f"dp x tp must equal the {n} available devices, found {given}, which does not divide {n}")
    return Mesh(np.array(devices).reshape(dp, tp), AXES)


def platform(mesh: Mesh) -> str:
    """Where the mesh's devices are: 'cpu', 'gpu' or 'tpu' (abstract TPU devices too, when compiling for a slice)."""
    return mesh.devices.flat[0].platform


def check_heads(mesh: Mesh, num_heads: int, what: str) -> None:
    tp = mesh.shape["tp"]
    if num_heads % tp:
        raise MeshError(f"tp must divide the {num_heads} attention heads of the {what}, found tp={tp}")


def spec_for(name: str, rules: Sequence[tuple[str, P]]) -> tuple[P, str | None]:
    """The first rule matching `name`, and its pattern (None: replicated by default). A stacked family of per-layer
    weights [L, ...] ("blocks.*.attn1.to_q.weight", tpu_wan.runtime.stacking) takes its layers' rule with the
    layer axis unsplit, so each layer's slice is placed as that layer alone would be."""
    if f".{LAYER}." in name:
        spec, pattern = spec_for(name.replace(f".{LAYER}.", ".0.", 1), rules)
        return P(None, *spec), pattern
    for pattern, spec in rules:
        if re.search(pattern, name):
            return spec, pattern
    return REPLICATED, None


def batch_sharding(mesh: Mesh, batch: int, ndim: int) -> NamedSharding:
    """Rows on dp when they divide evenly, else replicated (a batch of 1 cannot be split)."""
    if batch % mesh.shape["dp"] == 0:
        return NamedSharding(mesh, P("dp", *([None] * (ndim - 1))))
    return NamedSharding(mesh, P())


def shard_weights(
    weights: Mapping[str, np.ndarray], rules: Sequence[tuple[str, P]], mesh: Mesh
) -> dict[str, jax.Array]:
    """Places each weight on the mesh with the spec its rule gives; refuses a split that does not divide."""
    placed = {}
    for name, value in weights.items():
        spec, _ = spec_for(name, rules)
        check_divisible(name, value.shape, spec, mesh)
        placed[name] = jax.device_put(value, NamedSharding(mesh, spec))
    return placed


def abstract_weights(
    shapes: Mapping[str, tuple[Sequence[int], np.dtype]], rules: Sequence[tuple[str, P]], mesh: Mesh
) -> dict[str, jax.ShapeDtypeStruct]:
    """What shard_weights / loading.load_sharded would place, as shapes and shardings only (nothing is read or
    allocated): the weights of a program compiled for a slice that is not attached (tpu_wan.run.aot)."""
    placed = {}
    for name, (shape, dtype) in shapes.items():
        spec, _ = spec_for(name, rules)
        check_divisible(name, shape, spec, mesh)
        placed[name] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=NamedSharding(mesh, spec))
    return placed


def check_divisible(name: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
    """Refuses a split of a dimension the mesh axis does not divide."""
    for dim, axis in enumerate(spec):
        if axis is not None and shape[dim] % mesh.shape[axis]:
            raise MeshError(f"{name}: dim {dim} of shape {tuple(shape)} must divide by {axis}={mesh.shape[axis]}")
