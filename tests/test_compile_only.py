"""--topology NAME --compile_only: every program of a run compiled by the TPU compiler on this CPU host
(libtpu, deviceless), with the same code path as a real run and no weights read."""

import functools
import importlib.util
import json

import pytest
from scripts import GENERATE, STAGE2, load, run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed: nothing can compile for a TPU on this host")

# 16x16: the smallest frame the VAE takes, whose convolutions XLA:TPU compiles ~4x faster than 32x32 (8 s vs 45 s for
# the VAE's frame scan on v6e-8); the DiT still sees 2 video tokens through our kernel.
TINY_RUN = ("--model_id", "tiny-random", "--height", "16", "--width", "16", "--frames", "5", "--attention", "custom")
# One DiT sharding mode where the mode is not what a test is about: --sharding auto compiles both (one step each).
MEGATRON = ("--sharding", "megatron")
PROGRAM_FIELDS = {"name", "compile_s", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
                  "generated_code_bytes", "held_bytes", "peak_bytes", "flops", "ideal_flops", "collectives",
                  "custom_calls", "fits", "skipped"}


def no_weights(monkeypatch):
    """Any read of weights, tokenizer or video write fails the test."""
    from tpu_wan.core import video
    from tpu_wan.models import checkpoints, vae
    from tpu_wan.runtime import loading

    def refuse(*args, **kwargs):
        raise AssertionError("a compile-only run read weights or wrote a video")

    for module, name in ((loading, "load_sharded"), (vae, "load_params"), (checkpoints, "load_tokenizer"),
                         (video, "write_video")):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="module")
def generate_v6e8(tmp_path_factory):
    """generate_flax.py's compile-only run of the tiny model on v6e-8 (dp 2, tp 4), in this process."""
    folder = tmp_path_factory.mktemp("v6e8")
    mp = pytest.MonkeyPatch()
    no_weights(mp)
    try:
        load(GENERATE).main([*TINY_RUN, *MEGATRON, "--prompt", "a cat", "--negative_prompt", "blurry", "--topology",
                             "v6e-8", "--compile_only",
                            "--dp", "2", "--tp", "4", "--output_dir", str(folder)])
    finally:
        mp.undo()
    return folder, json.loads((folder / "metrics.json").read_text())


def test_every_program_of_the_run_compiles_for_v6e8(generate_v6e8):
    folder, m = generate_v6e8
    assert m["target"] == {"topology": "v6e-8", "device_kind": "TPU v6 lite", "devices": 8, "hosts": 1,
                           "hbm_bytes_per_device": 32 << 30, "usable_hbm_bytes_per_device": int(31.25 * 2**30)}
    assert m["mesh"] == {"dp": 2, "tp": 4} and m["one_process"] and m["fits"]
    # the TPU's default, as a real run there decides it; generate_flax.py encodes in the model dtype too
    assert m["config"]["dtype"] == m["config"]["text_dtype"] == "bfloat16"
    names = {stage: [p["name"] for p in s["compiled"]] for stage, s in m["stages"].items()}
    assert names == {"text_encoder": ["encode (2, 512)"], "transformer": ["step cfg=True"],
                     "vae": ["decode", "to_uint8"]}
    for stage in m["stages"].values():
        for p in stage["compiled"]:
            assert set(p) == PROGRAM_FIELDS and p["skipped"] is None and p["fits"]
            assert p["compile_s"] > 0 and p["argument_bytes"] > 0
            # one process: the other two models' weights are on the devices too
            assert p["held_bytes"] == sum(s["weights_bytes_per_device"] for s in m["stages"].values()) \
                - stage["weights_bytes_per_device"]
    step = m["stages"]["transformer"]["compiled"][0]
    assert step["custom_calls"].get("tpu_custom_call", 0) >= 1  # self-attention is the Mosaic kernel
    assert step["collectives"]["all-reduce"]["count"] > 0  # tp=4: Megatron's reductions
    decode = m["stages"]["vae"]["compiled"][0]
    assert decode["custom_calls"].get("tpu_custom_call", 0) >= 1  # the VAE's convolutions: the causal_conv kernel
    assert not list(folder.glob("*.mp4"))


def test_report_renders_a_compile_only_document(generate_v6e8):
    from tpu_wan.core import report

    folder, m = generate_v6e8
    text = report.render(m, title="metrics.json")
    assert "## Compiled for v6e-8" in text and "| transformer | step cfg=True |" in text
    assert "tpu_custom_call x" in text and "Verdict: everything fits" in text


def test_the_numbers_are_the_programs_own():
    """An entry's bytes and FLOPs are what the program's shapes and shardings say, computed here by hand: x [64, 128]
    float32 split over dp, w [128, 256] bfloat16 split over tp, x @ w [64, 256] float32 split over both, on v5e-4
    (dp 2 x tp 2)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tpu_wan.run import aot
    from tpu_wan.runtime.mesh import make_mesh
    from tpu_wan.tpu import topology

    target = topology.parse_target("v5e-4")
    mesh = make_mesh(2, 2, target.devices())
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, P("dp", None)))
    w = jax.ShapeDtypeStruct((128, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "tp")))
    out = NamedSharding(mesh, P("dp", "tp"))
    jitted = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), out_shardings=out)
    entry = aot.compile_program("matmul", jitted, (x, w), ideal_flops=2 * 64 * 128 * 256, devices=4, held_bytes=100,
                                usable=target.usable_hbm_bytes)
    assert entry["argument_bytes"] == 32 * 128 * 4 + 128 * 128 * 2  # one device's shards of x and w
    assert entry["output_bytes"] == 32 * 128 * 4  # its [32, 128] block of the product
    assert entry["flops"] == 2 * 32 * 128 * 128 == entry["ideal_flops"]  # its block: no communication needed
    assert entry["peak_bytes"] == (entry["argument_bytes"] + entry["output_bytes"] - entry["alias_bytes"]
                                   + entry["temp_bytes"] + entry["generated_code_bytes"] + 100)
    assert entry["fits"] and entry["skipped"] is None and entry["collectives"]["all-reduce"]["count"] == 0


def test_a_layer_loop_counts_every_trip():
    """A stack of 6 layers (a Megatron pair, then batched matmuls) run as one loop over stacked weights, as the DiT's
    blocks run, reports the flops and collectives of the same stack unrolled: XLA's cost analysis counts the loop
    body once, and XLA:TPU writes no known_trip_count, so both counts read the trips from the loop
    (tpu_wan.tpu.hlo)."""
    import jax
    import jax.numpy as jnp
    from conftest import LOOP_FLOPS_RTOL
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tpu_wan.run import aot
    from tpu_wan.runtime.mesh import make_mesh
    from tpu_wan.tpu import topology

    layers, target = 6, topology.parse_target("v5e-4")
    mesh = make_mesh(2, 2, target.devices())
    x = jax.ShapeDtypeStruct((64, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P("dp", None)))
    up = jax.ShapeDtypeStruct((layers, 128, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, None, "tp")))
    down = jax.ShapeDtypeStruct((layers, 256, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "tp", None)))

    def layer(i, h, up, down):  # column- then row-parallel (one all-reduce of h), then attention-like batched matmuls
        pick = functools.partial(jax.lax.dynamic_index_in_dim, index=i, keepdims=False)
        g = (jnp.tanh(h @ pick(up)) @ pick(down)).reshape(4, 16, 128)  # [B L D], B split over dp
        return jnp.einsum("bqk,bkd->bqd", jnp.einsum("bqd,bkd->bqk", g, g), g).reshape(64, 128)

    programs = {"scan": lambda h, up, down: jax.lax.fori_loop(0, layers, lambda i, h: layer(i, h, up, down), h),
                "unrolled": lambda h, up, down: functools.reduce(lambda h, i: layer(i, h, up, down), range(layers), h)}
    entries = {name: aot.compile_program(name, jax.jit(fn), (x, up, down), ideal_flops=0, devices=4, held_bytes=0,
                                         usable=target.usable_hbm_bytes) for name, fn in programs.items()}
    # per device: [32, 128] x [128, 128] twice (up and down, their out / in dim split over tp), and on its 2 rows of
    # B: [16, 128] x [128, 16], then [16, 16] x [16, 128]
    matmuls = layers * (2 * (2 * 32 * 128 * 128) + 2 * (2 * 2 * 16 * 16 * 128))
    for name, entry in entries.items():
        assert entry["collectives"]["all-reduce"]["count"] == layers, name
        assert abs(entry["flops"] / matmuls - 1) <= LOOP_FLOPS_RTOL, (name, entry["flops"], matmuls)
    assert entries["scan"]["collectives"] == entries["unrolled"]["collectives"]


def test_generate_compiles_for_v5e4(tmp_path, monkeypatch, capsys):
    """v5e-4 (dp 2, tp 2 by default); the VAE, compiled above for v6e-8, is left out (--compile_stages) here: a
    stage left out is named as such and its weights still count beside the others."""
    no_weights(monkeypatch)
    load(GENERATE).main([*TINY_RUN, *MEGATRON, "--topology", "v5e-4", "--compile_only", "--compile_stages",
                         "text_encoder", "transformer", "--output_dir", str(tmp_path)])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["mesh"] == {"dp": 2, "tp": 2} and m["fits"] and list(m["stages"]) == ["text_encoder", "transformer"]
    assert set(m["resident_stages"]) == {"text_encoder", "transformer", "vae"}
    step = m["stages"]["transformer"]["compiled"][0]
    assert step["custom_calls"].get("tpu_custom_call", 0) >= 1
    assert step["held_bytes"] == m["resident_stages"]["text_encoder"] + m["resident_stages"]["vae"]
    assert "vae: not compiled (--compile_stages)" in capsys.readouterr().out


def test_stage2_compiles_its_step_for_v5e4(tmp_path, monkeypatch):
    no_weights(monkeypatch)
    load(STAGE2).main([*TINY_RUN[2:], *MEGATRON, "--num_prompts", "3", "--model_id", "tiny-random", "--seeds", "1", "2",
                 "--topology", "v5e-4", "--compile_only", "--output_dir", str(tmp_path)])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["target"]["topology"] == "v5e-4" and m["mesh"] == {"dp": 2, "tp": 2} and not m["one_process"]
    assert list(m["stages"]) == ["transformer"]
    (step,) = m["stages"]["transformer"]["compiled"]
    assert step["custom_calls"].get("tpu_custom_call", 0) >= 1 and step["held_bytes"] == 0
    assert m["config"]["batch_size"] == 1 and len(m["config"]["prompts"]) == 3
    assert not list(tmp_path.glob("*.safetensors"))


def test_search_mesh_ranks_every_mesh_the_heads_allow(tmp_path):
    load(STAGE2).main([*TINY_RUN[2:], "--num_prompts", "1", "--model_id", "tiny-random", "--topology", "v6e-8",
                 "--compile_only", "--search_mesh", "--output_dir", str(tmp_path)])
    m = json.loads((tmp_path / "metrics.json").read_text())
    ranked = m["mesh_search"]
    # the tiny DiT has 4 heads: tp in 1, 2, 4 on 8 chips, each in both sharding modes (--sharding auto), and tp 8
    # in sequence mode only (Megatron splits the heads)
    assert sorted((r["dp"], r["tp"], r["sharding"]) for r in ranked) == [(1, 8, "sequence")] + [
        (dp, tp, mode) for dp, tp in [(2, 4), (4, 2), (8, 1)] for mode in ("megatron", "sequence")]
    # tp 1 splits no weight: the step sends only 11 KiB over dp, where every tp > 1 sends its activations
    # (megatron: all-reduces of the hidden state; sequence: all-to-alls around attention)
    assert (ranked[0]["dp"], ranked[0]["tp"]) == (8, 1) and ranked[0]["step_traffic_bytes"] < 16 << 10
    assert all(r["step_traffic_bytes"] > 64 << 10 for r in ranked if r["tp"] > 1)
    assert m["mesh"] == {"dp": ranked[0]["dp"], "tp": ranked[0]["tp"]}
    assert m["config"]["sharding"] == ranked[0]["sharding"]


def test_auto_sharding_is_decided_by_the_compiler_when_compiling(tmp_path, monkeypatch):
    """A compile-only run with --sharding auto compiles both modes on its mesh and keeps the one the compiler says
    fits and sends less (megatron, here), even where the closed form says otherwise; the text encoder compiles
    once."""
    from tpu_wan.run import aot
    from tpu_wan.runtime import parallelism

    monkeypatch.setattr(parallelism, "choose", lambda *args, **kwargs: "sequence")
    compiled = []
    real = aot.compile_program
    monkeypatch.setattr(aot, "compile_program", lambda name, *a, **k: compiled.append(name) or real(name, *a, **k))
    load(GENERATE).main([*TINY_RUN, "--topology", "v5e-8", "--compile_only", "--compile_stages", "text_encoder",
                         "transformer", "--output_dir", str(tmp_path)])
    m = json.loads((tmp_path / "metrics.json").read_text())
    tried = {r["sharding"]: r for r in m["mesh_search"]}
    assert set(tried) == {"megatron", "sequence"} and all(r["fits"] for r in tried.values())
    cheaper = min(tried, key=lambda mode: tried[mode]["step_traffic_bytes"])
    assert m["config"]["sharding"] == cheaper == "megatron"
    assert sorted(compiled) == ["encode (2, 512)", "step cfg=True", "step cfg=True"]


@pytest.fixture(scope="module")
def one_block_wan_1_3b(tmp_path_factory):
    """Wan 2.1 1.3B's packaged configs with one transformer block: its real widths, compiled in seconds."""
    import shutil

    from tpu_wan.models import checkpoints

    folder = tmp_path_factory.mktemp("wan13-one-block") / "Wan2.1-T2V-1.3B-one-block"
    shutil.copytree(checkpoints.PACKAGED_CONFIGS / "Wan2.1-T2V-1.3B-Diffusers", folder)
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layers": 1}))
    return folder


@pytest.mark.parametrize("generation, mode, frames, tokens", [("v5e", "sequence", 25, 10920),
                                                             ("v6e", "megatron", 5, 3120)])
def test_the_closed_form_matches_the_compilers_count(one_block_wan_1_3b, generation, mode, frames, tokens):
    """What --sharding auto decides by when it compiles nothing: the bytes each chip sends per step by the closed
    form against the TPU compiler's own count, on 1.3B's real widths (one block, 480x832, CFG, bf16, dp 2 x tp 4),
    each mode on its own generation (the two count alike since hlo.summarize's fix: every row of bench/README.md's
    sharding table), sequence at a length where the FFN's weights are gathered."""
    from conftest import CLOSED_FORM_RTOL

    from tpu_wan.core.config import GenerationConfig, Stage2Settings, video_tokens
    from tpu_wan.models import checkpoints
    from tpu_wan.run import aot, pipeline
    from tpu_wan.runtime import parallelism
    from tpu_wan.runtime.mesh import make_mesh
    from tpu_wan.tpu import arithmetic, topology

    target = topology.parse_target(f"{generation}-8")
    mesh = make_mesh(2, 4, target.devices())
    base = GenerationConfig(model_id=str(one_block_wan_1_3b), prompts=("a",), negative_prompt="b",
                            max_sequence_length=512, text_dtype="bfloat16")
    cfg = pipeline.resolve_stage2(base, Stage2Settings(height=480, width=832, frames=frames, sharding=mode), mesh)
    (name, (jitted, args, ideal)), = aot.transformer_programs(one_block_wan_1_3b, mesh, cfg).programs.items()
    entry = aot.compile_program(name, jitted, args, ideal_flops=ideal, devices=8, held_bytes=0,
                                usable=target.usable_hbm_bytes)
    sent = sum(c["traffic_bytes"] for c in entry["collectives"].values())
    dit = checkpoints.read_config(one_block_wan_1_3b, "transformer")
    assert video_tokens(cfg.stage2.latent_shape(1, dit["in_channels"]), dit["patch_size"]) == tokens
    estimate = arithmetic.dit_step_traffic_bytes(dit, parallelism.Layout(mode, mesh), 2, tokens, 512, 2)
    print(f"{generation} {mode}: compiler {sent / 1e6:.1f} MB, closed form {estimate / 1e6:.1f} MB")
    assert abs(estimate / sent - 1) <= CLOSED_FORM_RTOL, (estimate, sent)


def test_rank_puts_what_fits_first_then_fewer_bytes_sent_then_lower_peak():
    from tpu_wan.run import aot

    def doc(name, fits, sent, peak):
        step = {"skipped": None if sent is not None else "not compiled", "peak_bytes": peak,
                "collectives": {} if sent is None else {"all-reduce": {"traffic_bytes": sent, "bytes": sent}}}
        return {"name": name, "fits": fits, "stages": {"transformer": {"compiled": [step]}}}

    docs = [doc("too big, sends nothing", False, 0, 10), doc("fits, not compiled", True, None, 1),
            doc("fits, sends 5, peak 9", True, 5, 9), doc("fits, sends 5, peak 7", True, 5, 7),
            doc("fits, sends 3", True, 3, 20)]
    assert [d["name"] for d in aot.rank(docs)] == [
        "fits, sends 3", "fits, sends 5, peak 7", "fits, sends 5, peak 9", "fits, not compiled",
        "too big, sends nothing"]


def test_candidate_runs_include_the_meshes_only_sequence_sharding_takes():
    from tpu_wan.run import aot
    from tpu_wan.tpu import topology

    v6e8 = topology.parse_target("v6e-8")
    # 1.3B: 12 DiT heads, UMT5 64: tp 8 splits the text encoder's heads but not the DiT's
    runs = aot.candidate_runs(v6e8, 64, 12, "auto")
    assert (1, 8, "sequence") in runs and (1, 8, "megatron") not in runs
    assert [r for r in runs if r[1] == 4] == [(2, 4, "megatron"), (2, 4, "sequence")]
    assert aot.candidate_runs(v6e8, 64, 12, "megatron") == [(8, 1, "megatron"), (4, 2, "megatron"), (2, 4, "megatron")]
    assert aot.candidate_runs(v6e8, None, 12, "sequence") == [(8 // t, t, "sequence") for t in (1, 2, 4, 8)]
    assert aot.candidate_runs(v6e8, 6, None, None) == [(8, 1, None), (4, 2, None)]  # no DiT: no mode
    assert aot.candidate_runs(topology.parse_target("v6e-1"), 64, 12, "auto") == [(1, 1, None)]  # one program


def test_14b_at_720p_does_not_fit_a_v5e_1(tmp_path):
    # In process (the one-line contract of a refusal, exit 3, is the next test's): 14B's weights alone exceed
    # one v5e chip, so its step is not compiled at all
    from tpu_wan.core.errors import DoesNotFit

    with pytest.raises(DoesNotFit) as info:
        load(STAGE2).main(["--model_id", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "--num_prompts", "1", "--height", "720",
                           "--width", "1280", "--frames", "81", "--topology", "v5e-1", "--compile_only",
                           "--output_dir", str(tmp_path)])
    message = str(info.value)
    assert "transformer program 'step cfg=True' on one TPU v5 lite chip" in message
    assert "expected at most the TPU compiler's limit of 15.75 GiB (HBM 16.00 GiB), found 26.6" in message
    assert "weights per device before any activation" in message
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["fits"] is False and m["stages"]["transformer"]["compiled"][0]["skipped"]


def test_two_experts_that_do_not_fit_together_say_so(tmp_path):
    # Wan 2.2 A14B on one v6e chip: each expert's 26.67 GiB (28.64 GB) of bf16 weights would fit the 31.25 GiB a
    # program may use, both together do not; the line names the idle expert and the flag that keeps it in host memory.
    from tpu_wan.core.errors import DoesNotFit

    with pytest.raises(DoesNotFit) as info:
        load(STAGE2).main(["--model_id", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "--num_prompts", "1", "--height", "480",
                           "--width", "832", "--frames", "81", "--topology", "v6e-1", "--compile_only",
                           "--output_dir", str(tmp_path)])
    message = str(info.value)
    assert "transformer program 'step cfg=True' on one TPU v6 lite chip" in message
    assert ("found 26.67 GiB of its model's weights per device before any activation (not compiled) with 26.67 GiB "
            "of the other models' weights beside it (the idle expert's 26.67 GiB included: --expert_offload keeps it "
            "in host memory)") in message
    transformer = json.loads((tmp_path / "metrics.json").read_text())["stages"]["transformer"]
    assert transformer["idle_expert_bytes_per_device"] * 2 == transformer["weights_bytes_per_device"]


def test_activations_the_compiler_refuses_end_in_one_line_and_keep_the_other_rows(tmp_path):
    # The tiny model's weights fit a v5e-1 easily; XLA attention at 720p x 81 frames keeps [B N L L] float32
    # logits (75,600 tokens): far past the HBM, and the TPU compiler itself refuses the step (RESOURCE_EXHAUSTED).
    proc = run(GENERATE, "--model_id", "tiny-random", "--height", "720", "--width", "1280", "--frames", "81",
               "--attention", "xla", "--topology", "v5e-1", "--compile_only", "--compile_stages", "text_encoder",
               "transformer", "--output_dir", tmp_path, check=False)
    assert proc.returncode == 3, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("INFO tpu_wan:")]  # the progress log
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "transformer program 'step cfg=True' on one TPU v5 lite chip" in proc.stderr
    assert "expected at most the TPU compiler's limit of 15.75 GiB" in proc.stderr
    assert "found the compiler refused it: it needs 170." in proc.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    (encode,), (step,) = m["stages"]["text_encoder"]["compiled"], m["stages"]["transformer"]["compiled"]
    assert encode["fits"] and encode["argument_bytes"] > 0  # the program that fits keeps its row
    assert not step["fits"] and step["argument_bytes"] is None and step["peak_bytes"] > 170 * 2**30
    assert step["skipped"].startswith("the compiler refused it") and step["compile_s"] > 0


@pytest.mark.parametrize("name", ["v4-8", "v5e-1", "v5p-8", "v6e-1"])
def test_the_fit_limit_is_the_compilers_own(name):
    """Each generation's usable HBM is what the TPU compiler says is available when it refuses a program."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from tpu_wan.tpu import hlo, topology

    target = topology.parse_target(name)
    mesh = Mesh(np.array(target.devices()[:1]), ("x",))
    too_big = jax.ShapeDtypeStruct((2 * target.hbm_bytes // 4 // 1024, 1024), jnp.float32,
                                   sharding=NamedSharding(mesh, P()))
    with pytest.raises(Exception) as info:
        jax.jit(lambda x: x + 1).lower(too_big).compile()
    oom = hlo.out_of_memory(info.value)
    assert oom is not None, str(info.value)[:300]
    # the compiler prints two decimals of GiB
    assert abs(oom.available_bytes - target.usable_hbm_bytes) <= 0.005 * 2**30, (oom, target.usable_hbm_bytes)


@pytest.mark.parametrize("args, expected", [
    (("--topology", "v7-8", "--compile_only"), "expected a TPU slice such as v5e-8"),
    (("--export", "programs"), "--export programs: expected --compile_only with it"),
    (("--topology", "v6e-8"), "expected --compile_only with it"),
    (("--topology", "v6e-8", "--compile_only", "--dp", "3"), "dp x tp must equal the 8"),
    (("--topology", "v6e-8", "--compile_only", "--tp", "8"), "tp must divide the 4 attention heads"),
    (("--topology", "v6e-8", "--compile_only", "--search_mesh", "--dp", "2"), "expected no --dp/--tp"),
    # blocks the interpreter takes but Mosaic's 128-lane logits tile does not: refused for a TPU, in one line
    (("--topology", "v6e-8", "--compile_only", "--bkvsize", "128", "--bkvcomputesize", "64"),
     "expected bkv_compute a multiple of 128 (lanes of the logits tile) for a compiled kernel, found 64"),
])
def test_bad_compile_only_invocations(args, expected, tmp_path):
    proc = run(GENERATE, *TINY_RUN, *args, "--output_dir", tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr
    assert not list(tmp_path.iterdir())


def test_with_libtpu_installed_runs_without_a_tpu_stay_quiet_on_the_cpu():
    """libtpu alone (no chip) makes jax's backend choice log errors about TPU hosts; the scripts' process setup
    leaves the TPU backend out where no chip is present, so a CPU run prints nothing new."""
    import os
    import subprocess
    import sys

    # as a user's shell has it: no platform chosen, none of the TPU_* settings compiling for a slice makes
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    ours = ("import argparse; from tpu_wan import cli; cli.setup_process(argparse.Namespace()); "
            "import jax; from jax.experimental import checkify; print(jax.default_backend())")  # all platforms known
    bare = "import jax; print(jax.default_backend())"
    results = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
               for code in (ours, bare)]
    assert [r.stdout.strip() for r in results] == ["cpu", "cpu"]
    assert results[0].stderr == ""
    assert "TPU_WORKER_HOSTNAMES" in results[1].stderr  # what the setup avoids (if libtpu goes quiet, drop it)


def test_a_multi_host_slice_compiles_and_says_so(tmp_path, capsys):
    load(STAGE2).main([*TINY_RUN[2:], *MEGATRON, "--num_prompts", "2", "--model_id", "tiny-random", "--topology",
                       "v5p-16", "--compile_only", "--output_dir", str(tmp_path)])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["target"]["devices"] == 8 and m["target"]["hosts"] == 2 and m["fits"]
    assert "on 2 host(s) (more chips than one host" in capsys.readouterr().out


def test_a_local_folder_without_weight_files_compiles(tiny_path, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_path, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    out = tmp_path / "out"
    load(STAGE2).main([*TINY_RUN[2:], "--num_prompts", "1", "--model_id", str(folder), "--topology", "v6e-1",
                       "--compile_only", "--output_dir", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["model_id"] == str(folder) and m["fits"]


@pytest.mark.parametrize("args, expected", [
    (("--num_prompts", "2"), "--num_prompts: expected a count >= 1 with --compile_only, found 2 without"),
    (("--topology", "v6e-8", "--compile_only", "--num_prompts", "0"), "expected a count >= 1"),
    (("--model_id", "tiny-random"), "--model_id: expected --compile_only --num_prompts N with it"),
    (("--topology", "v6e-8", "--compile_only", "--input_dir", "nowhere"), "nowhere"),
])
def test_bad_stage2_compile_only_invocations(args, expected, tmp_path):
    proc = run(STAGE2, *args, "--output_dir", tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr
    assert not list(tmp_path.iterdir())


def test_attention_the_tpu_compiler_refuses_is_one_error_before_the_run(tmp_path, monkeypatch):
    # The stage-2 checks compile the attention calls for the slice: a kernel Mosaic refuses (here: our VMEM
    # estimate and the chip's limit both shrunk to nothing, so our own check passes and Mosaic runs out of VMEM) is
    # an AttentionError naming the compiler, raised by the checks before the step is built.
    from tpu_wan.kernels import kernel_tiling
    from tpu_wan.runtime.attention import AttentionError

    monkeypatch.setattr(kernel_tiling, "vmem_limit_for", lambda kind: 1024)
    monkeypatch.setattr(kernel_tiling, "vmem_bytes", lambda *args: 0)
    with pytest.raises(AttentionError, match=r"the TPU compiler \(TPU v6 lite\) refused attention over 2 x 2 tokens"):
        load(STAGE2).main([*TINY_RUN[2:], "--num_prompts", "1", "--model_id", "tiny-random", "--topology", "v6e-8",
                           "--compile_only", "--output_dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_no_cfg_step_has_half_the_flops(tmp_path, monkeypatch):
    # --guidance_scale 1 and the distilled preset (--sample_solver distill: guidance 1.0) compile the step without
    # the unconditional half: the TPU compiler's count for one video is half the guided step's, and two unguided
    # videos (the rows CFG gives one) cost what one guided video does. XLA attention, so every FLOP of the step is in
    # XLA's own count.
    from conftest import NO_CFG_FLOPS_RATIO_ATOL, SAME_ROWS_FLOPS_RTOL

    no_weights(monkeypatch)
    flops = {}
    for name, flags in {"cfg": ("--guidance_scale", "5"), "guidance 1": ("--guidance_scale", "1"),
                        "distill": ("--sample_solver", "distill"),
                        "guidance 1, 2 videos": ("--guidance_scale", "1", "--batch_size", "2")}.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        load(GENERATE).main([*TINY_RUN[:-2], "--attention", "xla", *MEGATRON, "--batch_size", "1", *flags,
                             "--topology", "v6e-1", "--compile_only", "--compile_stages", "transformer",
                             "--output_dir", str(out)])
        (step,) = json.loads((out / "metrics.json").read_text())["stages"]["transformer"]["compiled"]
        assert step["name"] == f"step cfg={name == 'cfg'}"
        flops[name] = step["flops"]
    print({name: f"{flops['cfg'] / f:.4f}" for name, f in flops.items()})
    for name in ("guidance 1", "distill"):
        assert abs(flops["cfg"] / flops[name] - 2) <= NO_CFG_FLOPS_RATIO_ATOL, name
    assert abs(flops["cfg"] / flops["guidance 1, 2 videos"] - 1) <= SAME_ROWS_FLOPS_RTOL


@pytest.mark.parametrize("model_id", ["tiny-random-i2v", "tiny-random-ti2v"])
def test_image_to_video_compiles_its_image_programs_for_v6e8(tmp_path, monkeypatch, model_id):
    """An I2V model needs an image (a stand-in, as nothing is read); TI2V takes one where --image is given. Stage 1
    adds CLIP's program (Wan 2.1 I2V) and the VAE encoder's (our convolution kernel), and the step takes the image
    inputs; no weight or image is read."""
    no_weights(monkeypatch)
    image = ["--image", str(tmp_path / "never_read.png")] if model_id == "tiny-random-ti2v" else []
    load(GENERATE).main(["--model_id", model_id, "--height", "32", "--width", "64", "--frames", "9",
                         "--num_inference_steps", "2", "--prompt", "a cat", *image, "--topology", "v6e-8",
                         "--compile_only", "--dp", "2", "--tp", "4", "--sharding", "megatron",
                         "--output_dir", str(tmp_path)])
    m = json.loads((tmp_path / "metrics.json").read_text())
    names = [p["name"] for p in m["stages"]["text_encoder"]["compiled"]]
    assert names == ["encode (2, 512)", *(["clip (2, 3, 32, 32)"] if model_id == "tiny-random-i2v" else []),
                     "vae_encode"]
    assert m["fits"] and m["config"]["image_size"] == [32, 64, 9]
    encode = m["stages"]["text_encoder"]["compiled"][-1]
    assert encode["custom_calls"].get("tpu_custom_call", 0) >= 1  # the encoder's convolutions: the kernel
    step = m["stages"]["transformer"]["compiled"][0]
    assert step["argument_bytes"] > 0 and step["fits"]
