"""The sharding rules: every large weight is placed by a rule, meshes are checked, results don't depend on them."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tpu_wan.models import checkpoints
from tpu_wan.runtime import mesh as mesh_lib
from tpu_wan.runtime import torchax_env
from tpu_wan.runtime.mesh import MeshError, make_mesh

# On the tiny model every projection is >= 1024 elements and every norm / bias / modulation table below, so
# this threshold separates the weights worth splitting from the ones too small to matter.
LARGE = 1024


def _rule_report(weights, rules):
    rows = []
    for name, value in weights.items():
        spec, pattern = mesh_lib.spec_for(name, rules)
        rows.append((name, value.shape, spec, pattern))
    return rows


@pytest.mark.parametrize("component", ["transformer", "text_encoder", "i2v-transformer", "image_encoder"])
def test_every_large_weight_has_a_rule(tiny_path, component):
    from tpu_wan.models import tiny

    i2v = tiny.ensure_tiny_checkpoint(model_id=tiny.TINY_I2V_ID)
    if component == "transformer":
        module, rules = checkpoints.load_transformer(tiny_path, "float32"), mesh_lib.WAN_TRANSFORMER_RULES
    elif component == "i2v-transformer":  # CLIP's keys and values in cross-attention, the image embedder
        module, rules = checkpoints.load_transformer(i2v, "float32"), mesh_lib.WAN_TRANSFORMER_RULES
    elif component == "image_encoder":
        module, rules = checkpoints.empty_image_encoder(i2v), mesh_lib.CLIP_RULES
    else:
        module, rules = checkpoints.load_text_encoder(tiny_path, "float32"), mesh_lib.UMT5_RULES
    weights, aliases = torchax_env.module_weights(module)
    if component == "image_encoder":  # parameters on the meta device: their shapes
        weights = {name: np.empty(shape, np.float32)
                   for name, (shape, _) in torchax_env.meta_parameters(module).items()}
    unplaced = []
    for name, shape, spec, pattern in _rule_report(weights, rules):
        size = int(np.prod(shape))
        if size >= LARGE:
            print(f"{name:70s} {str(shape):22s} {str(spec):22s} <- {pattern}")
            if pattern is None:
                unplaced.append(name)
    assert not unplaced, f"large weights with no sharding rule (would be replicated): {unplaced}"
    # Real weights are split: q/k/v column-parallel, out row-parallel.
    if component in ("transformer", "i2v-transformer"):
        assert mesh_lib.spec_for("blocks.0.attn1.to_q.weight", rules)[0] == P("tp", None)
        assert mesh_lib.spec_for("blocks.0.attn1.to_out.0.weight", rules)[0] == P(None, "tp")
        assert mesh_lib.spec_for("blocks.0.ffn.net.2.weight", rules)[0] == P(None, "tp")
    elif component == "text_encoder":
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


# The published models at their real sizes, built with their parameters on the meta device (shapes only, nothing
# allocated) exactly as the stages build them before loading, so the names and shapes are the ones sharded.
# Expected parameter counts, by hand from the packaged config.json files:
#
# WanTransformer3DModel, D = heads * head_dim, F = ffn_dim, L = num_layers, text_dim 4096, freq_dim 256,
# 16 channels in and out, patch 1x2x2 (4 pixels):
#   per block: attn1 and attn2 each q/k/v/out D*D + D and RMS norms on q, k (D each): 2 * (4D^2 + 4D + 2D)
#              cross-attention LayerNorm (norm2, affine): 2D; FFN D*F + F + F*D + D; scale_shift_table 6D
#              = 8D^2 + 2DF + 21D + F
#   outside:   patch_embedding 16*4*D + D; time_embedder 256*D + D + D^2 + D; time_proj 6D^2 + 6D;
#              text_embedder 4096*D + D + D^2 + D; proj_out D*64 + 64; scale_shift_table 2D
#              = 8D^2 + 4493D + 64
#   1.3B: D = 12 * 128 = 1536, F = 8960, L = 30:
#         30 * 46_440_704 + 25_775_680 = 1_418_996_800
#   14B:  D = 40 * 128 = 5120, F = 13824, L = 40:
#         40 * 351_394_304 + 232_719_424 = 14_288_491_584
# UMT5EncoderModel (UMT5-XXL, the same config in both packaged models): d_model 4096, 64 heads * d_kv 64 = 4096,
# d_ff 10240 (gated: wi_0, wi_1, wo), 24 layers, each with its own [32 buckets, 64 heads] position bias:
#   per layer: 4 * 4096^2 + 32*64 + 3 * 4096*10240 + 2 * 4096 (layer norms) = 192_948_224
#   shared embedding 256384 * 4096 = 1_050_148_864, counted once (encoder.embed_tokens is the same tensor);
#   final layer norm 4096:  24 * 192_948_224 + 1_050_148_864 + 4096 = 5_680_910_336
# Wan 2.1 I2V-14B: 14B's, plus 20 more input channels of the patch embedding (20 * 4 * D = 409_600), per layer the
# image keys' and values' projections and their norm (2 D^2 + 2D + D = 52_444_160; x 40 = 2_097_766_400), and the
# image embedder over CLIP's 1280 (LayerNorm 2 * 1280, 1280^2 + 1280, 1280 * D + D, LayerNorm 2D = 8_211_200):
#         14_288_491_584 + 409_600 + 2_097_766_400 + 8_211_200 = 16_394_878_784
REAL_MODELS = {
    "1.3B": ("Wan2.1-T2V-1.3B-Diffusers", "transformer", 1_418_996_800),
    "14B": ("Wan2.1-T2V-14B-Diffusers", "transformer", 14_288_491_584),
    "i2v-14B": ("Wan2.1-I2V-14B-720P-Diffusers", "transformer", 16_394_878_784),
    "umt5-xxl": ("Wan2.1-T2V-14B-Diffusers", "text_encoder", 5_680_910_336),
}
# At real sizes every projection and embedding of the blocks has >= 1536 * 1536 (2.4M) elements, while the
# largest weight no rule names is 14B's time_proj bias (6 * 5120 = 30720) and the RoPE tables are 1024 * 128, so
# this separates the weights worth splitting from those too small to matter.
REAL_LARGE = 1_000_000


@pytest.mark.parametrize("model", list(REAL_MODELS))
def test_real_models_are_split_by_the_rules(model):
    folder, component, expected_count = REAL_MODELS[model]
    path = checkpoints.PACKAGED_CONFIGS / folder
    if component == "transformer":
        module, rules = checkpoints.empty_transformer(path), mesh_lib.WAN_TRANSFORMER_RULES
        heads = module.config.num_attention_heads
    else:
        module, rules = checkpoints.empty_text_encoder(path), mesh_lib.UMT5_RULES
        heads = module.config.num_heads
    # What the stages place: the computed buffers (RoPE tables) and the parameters to load, in bfloat16 but for
    # the modules diffusers keeps in float32.
    buffers, _ = torchax_env.module_weights(module)
    params = checkpoints.expected_weights(module, "bfloat16")
    shapes = {**{name: (b.shape, b.dtype) for name, b in buffers.items()}, **params}

    count = sum(int(np.prod(shape)) for shape, _ in params.values())
    assert count == expected_count

    unplaced = [name for name, (shape, _) in shapes.items()
                if np.prod(shape) > REAL_LARGE and mesh_lib.spec_for(name, rules)[1] is None]
    assert not unplaced, f"large weights with no sharding rule (would be replicated): {unplaced}"

    # Every split divides on each mesh of the 8 devices whose tp divides the heads (1.3B: 12 heads, tp <= 4).
    tps = [tp for tp in (1, 2, 4, 8) if heads % tp == 0]
    assert tps == ([1, 2, 4] if model == "1.3B" else [1, 2, 4, 8])
    for tp in tps:
        mesh = make_mesh(8 // tp, tp)
        for name, (shape, _) in shapes.items():
            mesh_lib.check_divisible(name, shape, mesh_lib.spec_for(name, rules)[0], mesh)

    # Bytes as loaded, split (spread over tp) vs replicated (whole on every device).
    split = replicated = 0
    for name, (shape, dtype) in shapes.items():
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if "tp" in mesh_lib.spec_for(name, rules)[0]:
            split += nbytes
        else:
            replicated += nbytes
    gib = 2**30
    print(f"\n{model}: {count:,} parameters, {(split + replicated) / gib:.3f} GiB; at tp=4 "
          f"{split / gib:.3f} GiB split ({split / 4 / gib:.3f} per device), {replicated / 2**20:.2f} MiB replicated")
    # What stays replicated is norms, biases and tables: well under 1% of the model.
    assert replicated < 0.01 * (split + replicated)
