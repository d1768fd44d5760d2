"""Slice names, the HLO reader and the model-arithmetic yardstick behind compile-only runs (no libtpu needed)."""

import functools

import jax
import jax.numpy as jnp
import pytest

from tpu_wan.models import checkpoints
from tpu_wan.tpu import arithmetic, hlo, topology
from tpu_wan.tpu.topology import GIB


@pytest.mark.parametrize("name, chips, hosts, kind, hbm_gib, usable_gib, grid", [
    ("v4-8", 4, 1, "TPU v4", 32, 30.75, "v4:2x2x1"),
    ("v5e-1", 1, 1, "TPU v5 lite", 16, 15.75, "v5e:1x1"),
    ("v5e-4", 4, 1, "TPU v5 lite", 16, 15.75, "v5e:2x2"),
    ("v5e-8", 8, 1, "TPU v5 lite", 16, 15.75, "v5e:2x4"),
    ("v5p-8", 4, 1, "TPU v5", 96, 95.74, "v5:2x2x1"),
    ("v5p-16", 8, 2, "TPU v5", 96, 95.74, "v5:2x2x2"),
    ("v6e-1", 1, 1, "TPU v6 lite", 32, 31.25, "v6e:1x1"),
    ("v6e-8", 8, 1, "TPU v6 lite", 32, 31.25, "v6e:2x4"),
    ("v6e-16", 16, 4, "TPU v6 lite", 32, 31.25, "v6e:4x4"),
])
def test_slice_names(name, chips, hosts, kind, hbm_gib, usable_gib, grid):
    target = topology.parse_target(name)
    assert (target.chips, target.hosts, target.topology) == (chips, hosts, grid)
    assert target.describe() == {"topology": name, "device_kind": kind, "devices": chips, "hosts": hosts,
                                 "hbm_bytes_per_device": hbm_gib * GIB,
                                 "usable_hbm_bytes_per_device": int(usable_gib * GIB)}


@pytest.mark.parametrize("name", ["v6e-3", "v5p-6", "v7-8", "v6e", "tpu-8", ""])
def test_unknown_slices_are_refused_naming_the_known_ones(name):
    with pytest.raises(topology.TopologyError, match=f"found {name!r}") as err:
        topology.parse_target(name)
    assert "v6e-8" in str(err.value) and "v5p-16" in str(err.value)


# A hand-written module: the entry all-reduces once, a while loop (trip count 5) all-gathers and permutes each
# trip inside an async wrapper, and one loop of unknown trip count all-to-alls once. Its replica groups use XLA's
# three spellings (explicit lists, iota, named mesh axes) and none (every one of the module's 8 partitions).
HLO = """
HloModule m, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%async_body (p: bf16[16,128]) -> bf16[64,128] {
  %p = bf16[16,128]{1,0} parameter(0)
  ROOT %ag = bf16[64,128]{1,0} all-gather(%p), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
}

%body (t: (s32[], bf16[16,128])) -> (s32[], bf16[16,128]) {
  %t = (s32[], bf16[16,128]{1,0}) parameter(0)
  %x = bf16[16,128]{1,0} get-tuple-element(%t), index=1
  %start = ((bf16[16,128]{1,0}), bf16[64,128]{1,0}) async-start(%x), calls=%async_body
  %cp = (bf16[16,128]{1,0}, bf16[16,128]{1,0}, u32[], u32[]) collective-permute-start(%x), source_target_pairs={{0,1}}
  %kernel = bf16[16,128]{1,0} custom-call(%x), custom_call_target="tpu_custom_call"
  ROOT %r = (s32[], bf16[16,128]{1,0}) tuple(%i, %x)
}

%cond (t: (s32[], bf16[16,128])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%body2 (u: f32[4,4]) -> f32[4,4] {
  %u = f32[4,4]{1,0} parameter(0)
  ROOT %a2a = f32[4,4]{1,0} all-to-all(%u), dimensions={0}
}

ENTRY %main (x: f32[8,128], y: bf16[16,128]) -> f32[8,128] {
  %x = f32[8,128]{1,0} parameter(0)
  %y = bf16[16,128]{1,0} parameter(1)
  %ar = f32[8,128]{1,0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add
  %w = (s32[], bf16[16,128]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %w2 = f32[4,4]{1,0} while(%u0), condition=%cond, body=%body2
  ROOT %rs = f32[2,128]{1,0} reduce-scatter(%x), replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
}
"""


def test_hlo_summary_counts_loop_trips_and_bytes_per_device():
    summary = hlo.summarize(HLO)
    c = summary["collectives"]
    # traffic: what one device sends, ring algorithms over its group of n (all-reduce 2 (n-1)/n of its operand,
    # all-gather (n-1)/n of its result, reduce-scatter and all-to-all (n-1)/n of their operand, a permute its operand)
    assert c["all-reduce"] == {"count": 1, "bytes": 8 * 128 * 4, "traffic_bytes": 2 * 8 * 128 * 4 // 2}  # {0,1}: n=2
    assert c["reduce-scatter"] == {"count": 1, "bytes": 8 * 128 * 4,  # the full input it reads
                                   "traffic_bytes": 8 * 128 * 4 * 3 // 4}  # [2,4]<=[8]: 2 groups of 4
    assert c["all-gather"] == {"count": 5, "bytes": 5 * 64 * 128 * 2,  # the gathered result, each trip
                               "traffic_bytes": 5 * 64 * 128 * 2 * 3 // 4}  # over axis_1: n=4
    assert c["collective-permute"] == {"count": 5, "bytes": 5 * 16 * 128 * 2,  # its operand, not the tuple
                                       "traffic_bytes": 5 * 16 * 128 * 2}
    assert c["all-to-all"] == {"count": 1, "bytes": 4 * 4 * 4,  # unknown trip count: once
                               "traffic_bytes": 4 * 4 * 4 * 7 // 8}  # no groups: all 8 partitions
    assert summary["custom_calls"] == {"tpu_custom_call": 5}


# A counted loop as XLA:TPU writes a `fori_loop(1, 5)` (no known_trip_count): the counter starts at 1 (a copy of a
# constant in the initial tuple), the condition compares it with 5, the body adds 1. Each of its 4 trips runs a
# [8,16] x [16,32] matmul (as a convolution, XLA:TPU's spelling) inside a fusion, a kernel with a cost estimate and
# an all-reduce.
COUNTED_LOOP_HLO = """
HloModule m, num_partitions=2

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_matmul (x: f32[8,16], w: f32[16,32]) -> f32[8,32] {
  %x = f32[8,16]{1,0} parameter(0)
  %w = f32[16,32]{1,0} parameter(1)
  ROOT %conv = f32[8,32]{1,0} convolution(%x, %w), dim_labels=bf_io->bf
}

%body (t: (s32[], f32[8,16], f32[16,32])) -> (s32[], f32[8,16], f32[16,32]) {
  %t = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%t), index=1
  %w = f32[16,32]{1,0} get-tuple-element(%t), index=2
  %y = f32[8,32]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_matmul
  %k = f32[8,16]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"cost_estimate":{"flops":"1000"}}
  %ar = f32[8,16]{1,0} all-reduce(%k), replica_groups={{0,1}}, to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %r = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) tuple(%next, %ar, %w)
}

%cond (t: (s32[], f32[8,16], f32[16,32])) -> pred[] {
  %t = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) parameter(0)
  %limit = s32[] constant(5)
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

ENTRY %main (x: f32[8,16], w: f32[16,32]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %w = f32[16,32]{1,0} parameter(1)
  %c1 = s32[] constant(1)
  %start = s32[] copy(%c1)
  %t0 = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) tuple(%start, %x, %w)
  %loop = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) while(%t0), condition=%cond, body=%body
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_hlo_summary_reads_the_trip_count_of_a_counted_loop():
    summary = hlo.summarize(COUNTED_LOOP_HLO)
    assert summary["collectives"]["all-reduce"]["count"] == 4
    assert summary["custom_calls"] == {"tpu_custom_call": 4}
    # XLA's cost analysis counts the body once; the 3 trips it leaves out add their matmul and kernel flops
    assert summary["loop_trip_flops"] == 3 * (2 * 8 * 32 * 16 + 1000)
    for direction, trips in (("LE", 5), ("NE", None)):  # i <= 5 from 1: 5 trips; != is not read (counted once)
        text = COUNTED_LOOP_HLO.replace("direction=LT", f"direction={direction}")
        assert hlo.summarize(text)["collectives"]["all-reduce"]["count"] == (trips or 1), direction


# XLA:TPU's async collective fusion, as v5e compiles a weight gather: the all-gather appears in the fusion that
# starts it and in each fusion continuing it, with one channel and chain id (it runs once); shard_map's own
# collectives share channel_id=1 and no chain id, and each runs.
CHAINED_HLO = """
HloModule m, num_partitions=8

%start_fusion (p: bf16[2,128]) -> bf16[8,128] {
  %p = bf16[2,128]{1,0} parameter(0)
  ROOT %ag.0 = bf16[8,128]{1,0} all-gather(%p), channel_id=7, replica_groups=[2,4]<=[8], dimensions={0}, frontend_attributes={chain_id="3"}
}

%continue_1 (p: bf16[2,128]) -> bf16[8,128] {
  %p = bf16[2,128]{1,0} parameter(0)
  ROOT %ag.1 = bf16[8,128]{1,0} all-gather(%p), channel_id=7, replica_groups=[2,4]<=[8], dimensions={0}, frontend_attributes={chain_id="3"}
}

%continue_2 (p: bf16[2,128]) -> bf16[8,128] {
  %p = bf16[2,128]{1,0} parameter(0)
  ROOT %ag.2 = bf16[8,128]{1,0} all-gather(%p), channel_id=7, replica_groups=[2,4]<=[8], dimensions={0}, frontend_attributes={chain_id="3"}
}

ENTRY %main (x: bf16[2,128], y: f32[4,4]) -> bf16[8,128] {
  %x = bf16[2,128]{1,0} parameter(0)
  %y = f32[4,4]{1,0} parameter(1)
  %a = bf16[8,128]{1,0} fusion(%x), kind=kCustom, calls=%start_fusion
  %b = bf16[8,128]{1,0} fusion(%x), kind=kCustom, calls=%continue_1
  %c = bf16[8,128]{1,0} fusion(%x), kind=kCustom, calls=%continue_2
  %t1 = f32[4,4]{1,0} all-to-all(%y), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %t2 = f32[4,4]{1,0} all-to-all(%y), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  ROOT %r = bf16[8,128]{1,0} add(%a, %b)
}
"""


def test_hlo_summary_counts_a_chained_async_collective_once():
    c = hlo.summarize(CHAINED_HLO)["collectives"]
    assert c["all-gather"] == {"count": 1, "bytes": 8 * 128 * 2, "traffic_bytes": 8 * 128 * 2 * 3 // 4}
    assert c["all-to-all"] == {"count": 2, "bytes": 2 * 4 * 4 * 4, "traffic_bytes": 2 * 4 * 4 * 4 * 3 // 4}


def test_array_bytes_reads_tuples_and_ignores_layouts():
    assert hlo.array_bytes("(bf16[2,3]{1,0:T(2,128)(2,1)}, f32[4]{0}, u32[])") == 2 * 3 * 2 + 4 * 4 + 4
    assert hlo.array_bytes("(bf16[2,3]{1,0}, u32[])", skip_scalars=True) == 12


def test_dit_flops_formula_equals_the_traced_program(tiny_path):
    """The closed form from the config against every matmul of the real forward, counted in its jaxpr with XLA
    attention (einsums): two independent counts of the same arithmetic."""
    from tpu_wan.runtime import attention, torchax_env
    from tpu_wan.runtime import mesh as mesh_lib

    model = checkpoints.empty_transformer(tiny_path)
    config = dict(model.config)
    mesh = mesh_lib.make_mesh(1, 1, jax.devices()[:1])
    buffers, forward = torchax_env.functionalize(model, attention.make_attention("xla", mesh))
    shapes = {**{n: (b.shape, b.dtype) for n, b in buffers.items()},
              **checkpoints.expected_weights(model, "float32")}
    weights = mesh_lib.abstract_weights(shapes, mesh_lib.WAN_TRANSFORMER_RULES, mesh)
    rows, frames, h, w, text_len = 2, 3, 8, 12, 40
    x = jax.ShapeDtypeStruct((rows, config["in_channels"], frames, h, w), jnp.float32)
    t = jax.ShapeDtypeStruct((rows,), jnp.float32)
    text = jax.ShapeDtypeStruct((rows, text_len, config["text_dim"]), jnp.float32)
    traced = arithmetic.traced_flops(functools.partial(forward, return_dict=False), weights, x, t, text)
    tokens = frames * (h // 2) * (w // 2)
    assert traced == arithmetic.dit_forward_flops(config, rows, tokens, text_len)


def test_umt5_flops_formula_equals_the_traced_program(tiny_path):
    from tpu_wan.runtime import mesh as mesh_lib
    from tpu_wan.runtime import torchax_env

    model = checkpoints.empty_text_encoder(tiny_path)
    config = model.config.to_dict()
    buffers, forward = torchax_env.functionalize(model)
    mesh = mesh_lib.make_mesh(1, 1, jax.devices()[:1])
    shapes = {**{n: (b.shape, b.dtype) for n, b in buffers.items()}, **checkpoints.expected_weights(model, "float32")}
    weights = mesh_lib.abstract_weights(shapes, mesh_lib.UMT5_RULES, mesh)
    ids = jax.ShapeDtypeStruct((3, 24), jnp.int32)
    traced = arithmetic.traced_flops(lambda w, i: forward(w, i, attention_mask=i, return_dict=False)[0], weights, ids)
    assert traced == arithmetic.umt5_encoder_flops(config, 3, 24)


def test_each_text_encoder_program_gets_the_flops_of_its_own_texts(tiny_path):
    """40 prompts and the negative prompt run as chunks of 16, 16 and 9 texts: two distinct programs, the second
    one encoding 9 texts (padded to the mesh's dp=2: 10 rows)."""
    from tpu_wan.core.config import GenerationConfig
    from tpu_wan.models.text_encoder import ENCODE_BATCH
    from tpu_wan.run import aot
    from tpu_wan.runtime import mesh as mesh_lib

    assert ENCODE_BATCH == 16
    mesh = mesh_lib.make_mesh(2, 1, jax.devices()[:2])
    cfg = GenerationConfig(model_id="tiny-random", prompts=tuple(f"p{i}" for i in range(40)), negative_prompt="n",
                           max_sequence_length=32)
    built = aot.text_encoder_programs(tiny_path, mesh, cfg)
    config = checkpoints.read_config(tiny_path, "text_encoder", ())
    assert {name: ideal for name, (_, _, ideal) in built.programs.items()} == {
        "encode (16, 32)": arithmetic.umt5_encoder_flops(config, 16, 32),
        "encode (10, 32)": arithmetic.umt5_encoder_flops(config, 9, 32),
    }


def test_traced_flops_counts_scan_trips_and_convolutions():
    def f(x, k):  # [1 4 10 10] conv with a [6 4 3 3] kernel, 'VALID': [1 6 8 8]; then 7 matmuls of [8 8]
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "VALID")
        return jax.lax.scan(lambda c, _: (c @ c, None), y[0, 0], None, length=7)[0]

    x, k = jnp.zeros((1, 4, 10, 10)), jnp.zeros((6, 4, 3, 3))
    assert arithmetic.traced_flops(f, x, k) == 2 * (6 * 8 * 8) * (4 * 3 * 3) + 7 * 2 * 8 * 8 * 8


def test_packaged_configs_of_the_published_models():
    for model_id, heads, layers in (("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 12, 30),
                                    ("Wan-AI/Wan2.1-T2V-14B-Diffusers", 40, 40)):
        path = checkpoints.resolve_configs(model_id)
        dit = checkpoints.read_config(path, "transformer")
        assert (dit["num_attention_heads"], dit["num_layers"]) == (heads, layers)
        assert checkpoints.read_config(path, "text_encoder")["d_model"] == dit["text_dim"] == 4096
        assert not list(path.rglob("*.safetensors"))
    with pytest.raises(checkpoints.CheckpointError, match="to compile without weights, found 'org/other'"):
        checkpoints.resolve_configs("org/other")
