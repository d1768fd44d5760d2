"""Programs compiled ahead (tpu_wan.runtime.programs): `--compile_only --export DIR` writes every program of a run,
and the stages given `--programs DIR` load them instead of compiling, with the same bytes out; a key that does not
match compiles as usual after one warning line."""

import importlib.metadata
import importlib.util
import json
import re
import shutil

import jax
import pytest
from scripts import GENERATE, STAGE1, STAGE2, STAGE3, run, run_in_process

from tpu_wan.core import artifacts
from tpu_wan.runtime import programs

PROMPT = ("--model_id", "tiny-random", "--prompt", "a cat", "--negative_prompt", "blurry")
SIZE = ("--height", "32", "--width", "32", "--frames", "5", "--num_inference_steps", "2", "--sharding", "megatron")
MESH = ("--dp", "2", "--tp", "4")
# What a run of PROMPT at SIZE on MESH compiles: stage 3 without --save_frames converts to uint8 on device.
RUN_PROGRAMS = {"encode (2, 512)", "step cfg=True", "decode", "to_uint8"}
OUTPUTS = (artifacts.EMBEDDINGS_FILE, artifacts.LATENTS_FILE, artifacts.VIDEO_FILE)
STAGE1_FILES = (artifacts.EMBEDDINGS_FILE, artifacts.CONFIG_FILE)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """generate_flax.py's compile-only run for this process's own 8 CPU devices (no --topology), exported."""
    folder = tmp_path_factory.mktemp("programs")
    assert run_in_process(GENERATE, [*PROMPT, *SIZE, *MESH, "--compile_only", "--export", folder,
                                     "--output_dir", tmp_path_factory.mktemp("compile_only")]) == 0
    return folder


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The three stages without --programs (in this process): (their folder, a copy of its stage-1 files)."""
    out, stage1 = tmp_path_factory.mktemp("baseline"), tmp_path_factory.mktemp("baseline_stage1")
    assert run_in_process(STAGE1, [*PROMPT, "--output_dir", out, *MESH]) == 0
    for name in STAGE1_FILES:
        shutil.copy(out / name, stage1 / name)
    assert run_in_process(STAGE2, ["--input_dir", out, *SIZE, *MESH]) == 0
    assert run_in_process(STAGE3, ["--input_dir", out, *MESH]) == 0
    return out, stage1


def test_the_export_holds_every_program_of_the_run(exported):
    index = json.loads((exported / programs.INDEX_FILE).read_text())
    assert index["schema"] == programs.SCHEMA
    entries = list(index["programs"].values())
    assert {e["name"] for e in entries} == RUN_PROGRAMS and len(entries) == len(RUN_PROGRAMS)
    for key, e in index["programs"].items():
        assert (exported / e["file"]).stat().st_size == e["bytes"] > 0
        assert programs.key_of({k: e[k] for k in ("name", "environment", "mesh", "settings", "arguments")}) == key
        assert e["environment"]["platform"] == "cpu" and e["environment"]["jax"] == jax.__version__
        assert e["mesh"] == {"shape": {"dp": 2, "tp": 4}, "devices": list(range(8))}
    step = next(e for e in entries if e["name"] == "step cfg=True")
    assert step["settings"]["sharding"] == "megatron" and step["settings"]["model"]["num_layers"] >= 1


def test_stages_given_the_programs_compile_none_and_write_the_same_bytes(exported, baseline, tmp_path):
    flags = (*MESH, "--cpu_devices", "8", "--programs", exported)
    procs = [run(STAGE1, *PROMPT, "--output_dir", tmp_path, *flags),
             run(STAGE2, "--input_dir", tmp_path, *SIZE, *flags),
             run(STAGE3, "--input_dir", tmp_path, *flags)]
    stderr = "".join(p.stderr for p in procs)
    assert sorted(re.findall(r"programs: loaded '([^']+)'", stderr)) == sorted(RUN_PROGRAMS), stderr[-3000:]
    assert "programs: no match" not in stderr
    # every program's calls spent nothing tracing, lowering or compiling (jax's monitoring events)
    metrics = artifacts.load_metrics(tmp_path / artifacts.METRICS_FILE)
    spent = {name: s for stage in metrics["stages"].values() for name, s in stage["program_compile_s"].items()}
    assert spent == dict.fromkeys(RUN_PROGRAMS, 0.0)
    for name in OUTPUTS:
        assert (tmp_path / name).read_bytes() == (baseline[0] / name).read_bytes(), name


def test_a_key_that_does_not_match_compiles_after_one_warning_line(exported, baseline, tmp_path, caplog):
    folder, out = tmp_path / "programs", tmp_path / "out"
    shutil.copytree(exported, folder)
    index = json.loads((folder / programs.INDEX_FILE).read_text())
    key = next(k for k, e in index["programs"].items() if e["name"] == "step cfg=True")
    entry = index["programs"].pop(key)
    entry["environment"]["jax"] = "0.0.1"  # as if written by another jax: its key is another
    index["programs"]["0" * 64] = entry
    (folder / programs.INDEX_FILE).write_text(json.dumps(index))
    out.mkdir()
    for name in STAGE1_FILES:
        shutil.copy(baseline[1] / name, out / name)
    with caplog.at_level("INFO", logger="tpu_wan"):
        assert run_in_process(STAGE2, ["--input_dir", out, *SIZE, *MESH, "--programs", folder]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"programs: no match for 'step cfg=True' in {folder}: jax {jax.__version__} here vs 0.0.1 "
                        "there; compiling it"]
    assert (out / artifacts.LATENTS_FILE).read_bytes() == (baseline[0] / artifacts.LATENTS_FILE).read_bytes()
    assert artifacts.load_metrics(out / artifacts.METRICS_FILE)["stages"]["transformer"]["program_compile_s"][
        "step cfg=True"] > 0


@pytest.mark.parametrize("script, args, expected", [
    (STAGE1, ("--programs", "{missing}"), "--programs {missing}: expected a program directory"),
    (STAGE3, ("--programs", "{empty}"), "--programs {empty}: expected programs.json"),
    (STAGE2, ("--export", "{empty}"), "--export {empty}: expected --compile_only with it"),
    (GENERATE, ("--compile_only", "--programs", "{empty}"), "--programs {empty}: expected no --compile_only"),
    (GENERATE, ("--topology", "v6e-8", "--compile_only", "--cpu_devices", "8"), "expected no --cpu_devices"),
])
def test_bad_program_flags_are_one_line_and_status_2(script, args, expected, tmp_path, capsys):
    names = {"missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    names["empty"].mkdir()
    args = [a.format(**names) for a in args]
    assert run_in_process(script, ["--model_id", "tiny-random", *args] if script != STAGE3 else args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected.format(**names) in lines[0], lines
    assert list(names["empty"].iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_a_deviceless_tpu_compile_exports_its_programs(tmp_path):
    """Written here; loading them needs the TPU slice itself (not tested on this host)."""
    folder = tmp_path / "programs"
    assert run_in_process(GENERATE, ["--model_id", "tiny-random", "--height", "16", "--width", "16", "--frames", "5",
                                     "--attention", "custom", "--sharding", "megatron", "--topology", "v6e-8",
                                     "--compile_only", "--compile_stages", "text_encoder", "transformer",
                                     "--export", folder, "--output_dir", tmp_path]) == 0
    entries = json.loads((folder / programs.INDEX_FILE).read_text())["programs"].values()
    assert sorted(e["name"] for e in entries) == ["encode (2, 512)", "step cfg=True"]
    for e in entries:
        env = e["environment"]
        assert (env["platform"], env["device_kind"]) == ("tpu", "TPU v6 lite")
        assert env["libtpu"] == importlib.metadata.version("libtpu")
        assert (folder / e["file"]).stat().st_size == e["bytes"] > 0
