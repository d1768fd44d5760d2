"""The sharding rules: every large weight is placed by a rule, meshes are checked, results don't depend on them."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tpu_wan import checkpoints, mesh as mesh_lib, torchax_env
from tpu_wan.mesh import MeshError, make_mesh

# On the tiny model every projection is >= 1024 elements and every norm / bias / modulation table below, so
# this threshold separates the weights worth splitting from the ones too small to matter.
LARGE = 1024


def _rule_report(weights, rules):
    rows = []
    for name, value in weights.items():
        spec, pattern = mesh_lib.spec_for(name, rules)
        rows.append((name, value.shape, spec, pattern))
    return rows


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_every_large_weight_has_a_rule(tiny_path, component):
    if component == "transformer":
        module, rules = checkpoints.load_transformer(tiny_path, "float32"), mesh_lib.WAN_TRANSFORMER_RULES
    else:
        module, rules = checkpoints.load_text_encoder(tiny_path, "float32"), mesh_lib.UMT5_RULES
    weights, aliases = torchax_env.module_weights(module)
    unplaced = []
    for name, shape, spec, pattern in _rule_report(weights, rules):
        size = int(np.prod(shape))
        if size >= LARGE:
            print(f"{name:70s} {str(shape):22s} {str(spec):22s} <- {pattern}")
            if pattern is None:
                unplaced.append(name)
    assert not unplaced, f"large weights with no sharding rule (would be replicated): {unplaced}"
    # Real weights are split: q/k/v column-parallel, out row-parallel.
    if component == "transformer":
        assert mesh_lib.spec_for("blocks.0.attn1.to_q.weight", rules)[0] == P("tp", None)
        assert mesh_lib.spec_for("blocks.0.attn1.to_out.0.weight", rules)[0] == P(None, "tp")
        assert mesh_lib.spec_for("blocks.0.ffn.net.2.weight", rules)[0] == P(None, "tp")
    else:
        assert aliases == {"encoder.embed_tokens.weight": "shared.weight"}


def test_sharded_weights_are_split_on_the_mesh(tiny_path):
    weights, _ = torchax_env.module_weights(checkpoints.load_transformer(tiny_path, "float32"))
    placed = mesh_lib.shard_weights(weights, mesh_lib.WAN_TRANSFORMER_RULES, make_mesh(2, 4))
    q = placed["blocks.0.attn1.to_q.weight"]  # [64, 64] column-parallel on tp=4
    assert {s.data.shape for s in q.addressable_shards} == {(16, 64)}
    np.testing.assert_array_equal(np.asarray(q), weights["blocks.0.attn1.to_q.weight"])


def test_default_mesh_shape():
    assert mesh_lib.default_mesh_shape(8) == (2, 4)
    assert mesh_lib.default_mesh_shape(1) == (1, 1)
    assert mesh_lib.default_mesh_shape(3) == (1, 3)
    mesh = make_mesh()
    assert dict(mesh.shape) == {"dp": 2, "tp": 4}
    assert dict(make_mesh(tp=8).shape) == {"dp": 1, "tp": 8}


@pytest.mark.parametrize("dp, tp", [(3, 2), (2, 2), (0, 8), (16, None)])
def test_mesh_that_does_not_fit_is_refused(dp, tp):
    with pytest.raises(MeshError, match="dp x tp must equal the 8 available devices"):
        make_mesh(dp, tp)


def test_split_that_does_not_divide_is_refused():
    weights = {"blocks.0.attn1.to_q.weight": np.zeros((6, 4), np.float32)}
    with pytest.raises(MeshError, match=r"dim 0 of shape \(6, 4\) must divide by tp=4"):
        mesh_lib.shard_weights(weights, mesh_lib.WAN_TRANSFORMER_RULES, make_mesh(2, 4))
