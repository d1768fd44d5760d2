"""metrics.json: its schema, its numbers against the clock and the checkpoint files, the persistent compilation
cache (a cold run, then a warm one), previews, profiles and the report."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import TIME_ACCOUNTING_RTOL, WARM_COMPILE_MAX_FRACTION
from safetensors import safe_open
from scripts import GENERATE, ROOT, run

from tpu_wan.core import artifacts, preview
from tpu_wan.runtime import profiling

SIZE = ("--height", "32", "--width", "32", "--frames", "5", "--num_inference_steps", "3", "--seed", "3")
ONE_DEVICE = ("--cpu_devices", "1", "--warmup_steps", "1")
ITERATIONS = 3

STAGE_FIELDS = {
    "load_s": float, "warmup_s": float, "run_s": list, "io_s": float, "wall_s": (float, type(None)),
    "compile_s": float, "compilations": int, "cache_hits": int, "weights_bytes": int,
    "weights_bytes_per_device": int, "activation_bytes_per_device": int, "peak_device_bytes": (int, type(None)),
    "peak_host_rss_bytes": int, "steps": (int, type(None)), "s_per_step": (float, type(None)),
    "expert_swaps": (int, type(None)), "expert_swap_s": (float, type(None)),
    "block_stacks_run": (dict, type(None)), "block_stacks_computed": (int, type(None)),
    "mag_ratios": (dict, type(None)), "program_compile_s": (dict, type(None)),
}
TOP_FIELDS = {
    "schema": str, "script": str, "created": str, "backend": str, "device_kind": str, "device_count": int,
    "process_count": int, "device_memory_bytes": (int, type(None)), "mesh": dict, "config": dict,
    "num_iterations": int, "total_s": float, "time_to_first_step_s": (float, type(None)), "peak_host_rss_bytes": int,
    "peak_device_bytes": (int, type(None)),
    "stages": dict,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_path):
    """The same generation twice on a fresh compilation cache: cold (3 timed runs, previews), then warm
    (profiled)."""
    tmp = tmp_path_factory.mktemp("metrics")
    cache = ("--compilation_cache_dir", tmp / "cache")
    cold = run(GENERATE, "--model_id", "tiny-random", *SIZE, *ONE_DEVICE, *cache, "--num_iterations", str(ITERATIONS),
               "--output_video", tmp / "cold" / "video.mp4", "--preview")
    warm = run(GENERATE, "--model_id", "tiny-random", *SIZE, *ONE_DEVICE, *cache,
               "--output_video", tmp / "warm" / "video.mp4", "--profile", tmp / "trace")
    return tmp, cold, warm


def _metrics(tmp: Path, name: str) -> dict:
    return artifacts.load_metrics(tmp / name / artifacts.METRICS_FILE)


def _check_fields(doc: dict, fields: dict, where: str):
    assert set(doc) == set(fields), where
    for key, kind in fields.items():
        assert isinstance(doc[key], kind) and not isinstance(doc[key], bool), f"{where}.{key}: {doc[key]!r}"


def test_schema(runs):
    tmp, _, _ = runs
    m = _metrics(tmp, "cold")
    _check_fields(m, TOP_FIELDS, "metrics")
    assert m["schema"] == "tpu_wan.metrics/1" and m["script"] == "generate_flax.py"
    assert (m["backend"], m["device_count"], m["mesh"], m["num_iterations"]) == ("cpu", 1, {"dp": 1, "tp": 1}, 3)
    assert m["config"]["num_inference_steps"] == 3 and m["config"]["seeds"] == [3]
    assert list(m["stages"]) == ["text_encoder", "transformer", "vae"]
    for name, stage in m["stages"].items():
        _check_fields(stage, STAGE_FIELDS, name)
        assert len(stage["run_s"]) == ITERATIONS and all(t > 0 for t in stage["run_s"])
        assert stage["activation_bytes_per_device"] > 0 and stage["compilations"] > 0
        assert stage["compile_s"] <= stage["load_s"] + stage["warmup_s"] + sum(stage["run_s"])
    assert m["peak_host_rss_bytes"] == max(s["peak_host_rss_bytes"] for s in m["stages"].values())


def test_stage_times_add_up_to_the_total(runs):
    tmp, _, _ = runs
    m = _metrics(tmp, "cold")
    sections = sum(s["load_s"] + s["warmup_s"] + sum(s["run_s"]) + s["io_s"] for s in m["stages"].values())
    assert abs(sections - m["total_s"]) <= TIME_ACCOUNTING_RTOL * m["total_s"], (sections, m["total_s"])


def test_step_times(runs):
    tmp, _, _ = runs
    transformer = _metrics(tmp, "cold")["stages"]["transformer"]
    assert transformer["steps"] == 3  # 3 steps x 1 batch per run
    # Each run is its 3 steps plus drawing the noise and copying the latents back.
    assert 0 < transformer["s_per_step"] * 3 <= min(transformer["run_s"])


def _file_bytes(path: Path, keep=lambda key: True) -> int:
    with safe_open(path, "np") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) * 4 for k in f.keys() if keep(k))  # all float32


def test_weight_bytes_match_the_checkpoint(runs, tiny_path):
    from tpu_wan.models import checkpoints
    from tpu_wan.models.vae import DECODER_PREFIXES

    tmp, _, _ = runs
    stages = _metrics(tmp, "cold")["stages"]
    assert stages["text_encoder"]["weights_bytes"] == _file_bytes(tiny_path / "text_encoder" / "model.safetensors")
    # The transformer also holds its non-persistent buffers (rotary tables), which are not in the file.
    model = checkpoints.empty_transformer(tiny_path)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    files = _file_bytes(tiny_path / "transformer" / "diffusion_pytorch_model.safetensors")
    assert stages["transformer"]["weights_bytes"] == files + buffers
    # The VAE stage loads the decoder half only.
    decoder = _file_bytes(tiny_path / "vae" / "diffusion_pytorch_model.safetensors",
                          lambda k: k.startswith(DECODER_PREFIXES))
    assert stages["vae"]["weights_bytes"] == decoder
    for stage in stages.values():  # one device: it holds everything
        assert stage["weights_bytes_per_device"] == stage["weights_bytes"]


def test_table_is_printed(runs):
    _, cold, _ = runs
    lines = cold.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage ") and "compile s" in line)
    assert [line.split()[0] for line in lines[header + 1 : header + 4]] == ["text_encoder", "transformer", "vae"]
    assert any(line.startswith("metrics: ") and line.endswith("metrics.json") for line in lines)


def test_warm_start_skips_compiling(runs):
    tmp, _, _ = runs
    cold, warm = _metrics(tmp, "cold")["stages"], _metrics(tmp, "warm")["stages"]
    assert sum(s["cache_hits"] for s in cold.values()) == 0
    assert sum(s["cache_hits"] for s in warm.values()) >= 3  # at least each stage's main program
    cold_s, warm_s = (sum(s["compile_s"] for s in m.values()) for m in (cold, warm))
    assert warm_s < WARM_COMPILE_MAX_FRACTION * cold_s, (cold_s, warm_s)


def test_each_programs_compile_seconds_and_the_time_to_the_first_step(runs):
    tmp, cold_run, _ = runs
    cold, warm = _metrics(tmp, "cold"), _metrics(tmp, "warm")
    programs = {name: stage["program_compile_s"] for name, stage in cold["stages"].items()}
    assert {name: sorted(p) for name, p in programs.items()} == {
        "text_encoder": ["encode (2, 512)"], "transformer": ["step cfg=True"], "vae": ["decode", "to_uint8"]}
    for name, p in programs.items():  # parts of the stage's compile seconds, each program's first call
        assert all(s > 0 for s in p.values()) and sum(p.values()) <= cold["stages"][name]["compile_s"] + 1e-6, name
    # from the persistent cache, the step is fetched, not compiled
    step = "step cfg=True"
    assert warm["stages"]["transformer"]["program_compile_s"][step] < programs["transformer"][step]
    # process start to the first step's end: the imports, both models' loading and the step's compile, in order
    first = cold["time_to_first_step_s"]
    before = sum(cold["stages"][n]["load_s"] for n in ("text_encoder", "transformer")) + programs["transformer"][step]
    assert before < first < cold["total_s"] + 60, (before, first)
    assert f"time to first step: {first:.1f} s" in cold_run.stdout


def test_preview_beside_the_video(runs):
    tmp, _, _ = runs
    sheet = cv2.imread(str(tmp / "cold" / "video.png"))
    # 5 frames of 32 x 32 in 4 columns: 2 rows (module docstring's geometry).
    g, label = preview.GAP, preview.LABEL_HEIGHT
    assert sheet.shape == (g + 2 * (32 + label + g), g + 4 * (32 + g), 3)
    assert not (tmp / "warm" / "video.png").exists()


def test_profile_trace_written(runs):
    tmp, _, _ = runs
    assert list((tmp / "trace").glob("plugins/profile/*/*.xplane.pb"))


def test_report_renders(runs):
    tmp, _, _ = runs
    proc = subprocess.run([sys.executable, "-m", "tpu_wan.core.report", str(tmp / "cold" / artifacts.METRICS_FILE)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    headings = [line for line in proc.stdout.splitlines() if line.startswith("## ")]
    assert headings == ["## Run", "## Time per stage", "## Memory per component", "## What to change"]
    assert "transformer" in proc.stdout and "vae" in proc.stdout


def test_program_temp_bytes_need_no_second_compile(tiny_path):
    import jax

    from tpu_wan.run import pipeline
    from tpu_wan.runtime.mesh import make_mesh

    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    decoder = pipeline.load_decoder(tiny_path, mesh)
    decoder.decode(np.zeros((1, 16, 2, 4, 4), np.float32))
    before = profiling.compile_totals()
    temp = profiling.temp_bytes(decoder.programs)
    after = profiling.compile_totals()
    assert temp > 0 and after.compilations == before.compilations


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_nested_sections_count_once(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(profiling.time, "perf_counter", clock)
    rec = profiling.Recorder()
    with rec.section("transformer", "load"):
        clock.now += 2.0
    for _ in range(2):
        with rec.section("transformer", "run"):
            clock.now += 1.0
            with rec.section("transformer", "io"):  # a save inside the run
                clock.now += 0.25
            clock.now += 0.5
    m = rec.stages["transformer"]
    assert (m.load_s, m.run_s, m.io_s) == (2.0, [1.5, 1.5], 0.5)
    assert m.sections_s() == clock.now - 100.0


def _stage_doc(name: str, wall: float, rss: int) -> dict:
    stage = {field: None for field in STAGE_FIELDS} | {"wall_s": wall, "peak_host_rss_bytes": rss,
                                                       "peak_device_bytes": None}
    return {"schema": "tpu_wan.metrics/1", "script": "stages", "total_s": wall, "stages": {name: stage}}


def test_merging_stage_metrics():
    merged = profiling.merge_stage(None, _stage_doc("text_encoder", 2.0, 100), "text_encoder")
    merged = profiling.merge_stage(merged, _stage_doc("transformer", 5.0, 300), "transformer")
    merged = profiling.merge_stage(merged, _stage_doc("vae", 3.0, 200), "vae")
    assert list(merged["stages"]) == ["text_encoder", "transformer", "vae"]
    assert (merged["total_s"], merged["peak_host_rss_bytes"]) == (10.0, 300)
    # Stage 2 again: the VAE entry came from the old latents and goes.
    again = profiling.merge_stage(merged, _stage_doc("transformer", 4.0, 250), "transformer")
    assert list(again["stages"]) == ["text_encoder", "transformer"] and again["total_s"] == 6.0
    json.dumps(again, allow_nan=False)
