"""tpu_wan.core.report on hand-made metrics dicts: sections, numbers, advice, and the CLI's error contract."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tpu_wan.core import report

REPO = Path(__file__).resolve().parents[1]
GiB, MiB = 2**30, 2**20


def _stage(load, warmup, compile_s, runs, io, weights, per_device, act, peak, rss, steps=None, s_per_step=None):
    return {"load_s": load, "warmup_s": warmup, "run_s": runs, "io_s": io, "wall_s": None, "compile_s": compile_s,
            "compilations": 3, "cache_hits": 0, "weights_bytes": weights, "weights_bytes_per_device": per_device,
            "activation_bytes_per_device": act, "peak_device_bytes": peak, "peak_host_rss_bytes": rss,
            "steps": steps, "s_per_step": s_per_step}


def make_metrics(**overrides):
    """A valid stages-script metrics dict on a 2x4 mesh of 32 GiB devices; every number chosen to sum by hand."""
    m = {
        "schema": "tpu_wan.metrics/1", "script": "stages", "created": "2026-11-22T16:00:00Z",
        "backend": "tpu", "device_kind": "TPU v6 lite", "device_count": 8, "process_count": 1,
        "device_memory_bytes": 32 * GiB, "mesh": {"dp": 2, "tp": 4},
        "config": {"model_id": "Wan-AI/Wan2.1-T2V-14B-Diffusers", "prompts": ["a cat", "a dog"], "height": 720,
                   "width": 1280, "frames": 81, "num_inference_steps": 50, "seeds": [1, 2, 3], "batch_size": 2,
                   "dtype": "bfloat16", "text_dtype": "bfloat16", "vae_dtype": "float32", "guidance_scale": 5.0},
        "num_iterations": 2, "total_s": 300.0, "peak_host_rss_bytes": 6 * GiB, "peak_device_bytes": 13 * GiB,
        "stages": {  # deliberately out of order: the report puts them in pipeline order
            "vae": _stage(1.0, 9.0, 8.0, [4.0], 2.5, GiB, 256 * MiB, 6 * GiB, 7 * GiB, 2 * GiB),
            "text_encoder": _stage(10.0, 5.0, 4.0, [1.0, 4.0, 2.0], 0.5, 8 * GiB, 2 * GiB, 512 * MiB, 3 * GiB, 4 * GiB),
            "transformer": _stage(20.0, 30.0, 25.0, [100.0, 102.0], 1.0, 32 * GiB, 8 * GiB, 4 * GiB, 13 * GiB,
                                  6 * GiB, steps=50, s_per_step=2.0),
        },
    }
    m.update(copy.deepcopy(overrides))
    return m


def _section(text, title):
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_sections_in_order():
    text = report.render(make_metrics())
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == ["## Run", "## Time per stage", "## Memory per component", "## What to change"]


def test_run_section():
    run = _section(report.render(make_metrics()), "Run")
    assert "1280x720x81" in run and "dp 2 x tp 4" in run and "TPU v6 lite x 8" in run
    assert "2 prompts x 3 seeds = 6" in run
    assert "vae float32" in run and "2026-11-22T16:00:00Z" in run


def test_human_bytes():
    assert report.human_bytes(3 * 2**30) == "3.00 GiB"
    assert report.human_bytes(1536 * 2**10) == "1.50 MiB"
    assert report.human_bytes(512) == "512 B"
    assert report.human_bytes(None) == "n/a"


def test_time_table_and_totals_line():
    lines = _section(report.render(make_metrics()), "Time per stage").splitlines()
    rows = [line for line in lines if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| text_encoder", "| transformer", "| vae", "| **total**"]
    # median of [100, 102] = 101, their sum 202; s/step as given
    assert rows[1] == "| transformer | 20.00 | 30.00 | 25.00 | 2 | 101.00 | 202.00 | 1.00 | 2.00 |"
    assert rows[0] == "| text_encoder | 10.00 | 5.00 | 4.00 | 3 | 2.00 | 7.00 | 0.50 | n/a |"  # median of 1, 4, 2
    # load 10+20+1, warmup 5+30+9, compile 4+25+8, runs 7+202+4, io 0.5+1+2.5
    assert rows[3] == "| **total** | 31.00 | 44.00 | 37.00 |  |  | 213.00 | 4.00 |  |"
    totals = next(line for line in lines if line.startswith("Stages:"))
    # 31 + 44 + 213 + 4 = 292 of 300: 8 s, 2.7%, outside the stages
    assert "= 292.00 s of 300.00 s total" in totals and "8.00 s (2.7%)" in totals


def test_memory_table_and_peak():
    mem = _section(report.render(make_metrics()), "Memory per component")
    assert "| transformer | 32.00 GiB | 8.00 GiB | 4.00 GiB | 13.00 GiB | 6.00 GiB |" in mem
    assert "| vae | 1.00 GiB | 256.00 MiB | 6.00 GiB | 7.00 GiB | 2.00 GiB |" in mem
    assert "13.00 GiB per device (41% of 32.00 GiB)" in mem  # 13 / 32 = 40.6%


def test_all_fit_names_tightest_with_headroom():
    advice = _section(report.render(make_metrics()), "What to change")
    # needs: text 2 GiB + 0.5, transformer 8 + 4 = 12 GiB (37.5% of 32), vae 0.25 + 6
    assert "text_encoder 2.50 GiB, transformer 12.00 GiB, vae 6.25 GiB" in advice
    assert "All stages fit: the tightest, transformer, needs 38% of the device, 20.00 GiB of headroom" in advice
    assert "raise --tp" not in advice and "--vae_dtype" not in advice
    m = make_metrics()
    m["stages"]["vae"]["activation_bytes_per_device"] = 30 * GiB
    assert "raise --tp" not in report.render(m) and "no tp up to" not in report.render(m)  # VAE: nothing sharded


def test_generate_flax_holds_all_weights():
    advice = _section(report.render(make_metrics(script="generate_flax.py")), "What to change")
    # weights 2 + 8 + 0.25 = 10.25 GiB held by every stage; + transformer activations 4 GiB
    assert "transformer 14.25 GiB" in advice


def test_transformer_that_does_not_fit_gets_the_tp_that_does():
    m = make_metrics(mesh={"dp": 8, "tp": 1})
    m["stages"]["transformer"]["weights_bytes_per_device"] = 28 * GiB
    advice = _section(report.render(m, device_memory_gib=16), "What to change")
    # budget 0.85 * 16 = 13.6 GiB; tp 2: 14 + 4 = 18 (no); tp 4: 7 + 4 = 11 GiB (fits)
    assert "transformer needs 32.00 GiB per device" in advice
    assert "raise --tp from 1 to 4" in advice and "28.00 GiB -> 7.00 GiB, need 11.00 GiB" in advice
    assert "16.00 GiB per device (--device_memory_gib)" in advice
    assert "All stages fit" not in advice and "--dtype bfloat16" not in advice  # already bf16


def test_generate_flax_tp_advice_counts_every_sharded_weight():
    advice = _section(report.render(make_metrics(script="generate_flax.py"), device_memory_gib=16), "What to change")
    # budget 13.6 GiB; transformer need 2 + 8 + 0.25 + 4 = 14.25 GiB. tp divides the text encoder's and the
    # transformer's 10 GiB: tp 8 -> 5 GiB + 0.25 + 4 = 9.25 GiB. Alone (stage scripts): 8 + 4 = 12 GiB.
    assert "transformer needs 14.25 GiB per device" in advice
    assert "raise --tp from 4 to 8: weights per device 10.00 GiB -> 5.00 GiB, need 9.25 GiB" in advice
    assert "run the three stage scripts instead of generate_flax.py: each holds only its own weights (need 12.00 GiB)" \
        in advice
    assert "text_encoder needs" not in advice  # 10.25 + 0.5 fits
    # the VAE holds the same 10.25 GiB of weights + 6 GiB: tp 8 -> 5 + 0.25 + 6 = 11.25 GiB
    assert "vae needs 16.25 GiB per device" in advice and "raise --tp from 4 to 8: weights per device 10.00 GiB -> " \
        "5.00 GiB, need 11.25 GiB" in advice


def test_activations_too_large_for_any_tp():
    m = make_metrics()
    m["stages"]["transformer"]["activation_bytes_per_device"] = 30 * GiB
    advice = _section(report.render(m), "What to change")
    assert "no tp up to 64 fits: 30.00 GiB of the need does not shrink with tp" in advice


def test_float32_transformer_gets_bf16_advice():
    m = make_metrics(config={**make_metrics()["config"], "dtype": "float32"})
    m["stages"]["transformer"]["weights_bytes_per_device"] = 28 * GiB
    advice = _section(report.render(m), "What to change")
    assert "--dtype bfloat16 halves its weights (28.00 GiB -> 14.00 GiB)" in advice


@pytest.mark.parametrize("vae_dtype, advised", [("float32", True), ("bfloat16", False)])
def test_bf16_vae_advice_only_for_float32(vae_dtype, advised):
    m = make_metrics(config={**make_metrics()["config"], "vae_dtype": vae_dtype})
    m["stages"]["vae"]["activation_bytes_per_device"] = 30 * GiB
    advice = _section(report.render(m), "What to change")
    assert "vae needs 30.25 GiB per device" in advice and "fewer --frames or a smaller --batch_size" in advice
    assert ("--vae_dtype bfloat16 halves its activations (30.00 GiB -> 15.00 GiB)" in advice) is advised


def test_nulls_show_na_and_cpu_capacity_hint():
    m = make_metrics(backend="cpu", device_memory_bytes=None, peak_device_bytes=None, total_s=None)
    for s in m["stages"].values():
        s.update(peak_device_bytes=None, activation_bytes_per_device=None, wall_s=None)
    del m["stages"]["vae"]["io_s"]
    text = report.render(m)
    assert "| transformer | 32.00 GiB | 8.00 GiB | n/a | n/a | 6.00 GiB |" in text
    assert "| vae | 1.00 | 9.00 | 8.00 | 1 | 4.00 | 4.00 | n/a | n/a |" in text
    assert "Peak: n/a per device" in text and "of n/a s total" in text
    advice = _section(text, "What to change")
    assert "no device capacity (CPU)" in advice and "--device_memory_gib" in advice
    assert "transformer 8.00 GiB" in advice and "All stages fit" not in advice


@pytest.mark.parametrize("hits, advised", [(0, True), (2, False)])
def test_compile_cache_advice(hits, advised):
    m = make_metrics(total_s=60.0)  # compile 4 + 25 + 8 = 37 s of 60: 62%
    m["stages"]["vae"]["cache_hits"] = hits
    advice = _section(report.render(m), "What to change")
    assert ("--compilation_cache_dir" in advice) is advised
    assert ("37.00 s of the 60.00 s total (62%)" in advice) is advised


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tpu_wan.core.report", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def _refused(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_bad_schema_missing_file_not_json(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps(make_metrics(schema="tpu_wan.metrics/0")))
    _refused(_cli(bad), "expected schema 'tpu_wan.metrics/1'", "found 'tpu_wan.metrics/0'")
    _refused(_cli(tmp_path / "absent.json"), "absent.json")
    bad.write_text("{not json")
    _refused(_cli(bad), "expected valid UTF-8 JSON")
    bad.write_text("[1, 2]")
    _refused(_cli(bad), "found 'list'")
    _refused(_cli(bad, "--device_memory_gib", "0"), "--device_memory_gib must be > 0")


def test_cli_output_file_and_no_jax(tmp_path):
    metrics, out = tmp_path / "metrics.json", tmp_path / "sub" / "report.md"
    metrics.write_text(json.dumps(make_metrics()))
    proc = _cli(metrics, "--output", out)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert out.read_text() == report.render(make_metrics(), title=str(metrics))
    assert [p.name for p in out.parent.iterdir()] == ["report.md"]  # no temp file left
    check = ("import sys; from tpu_wan.core import report; report.main([sys.argv[1], '--output', sys.argv[2]]); "
             "print(sorted(m for m in ('jax', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", check, str(metrics), str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_cli_stdout(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(make_metrics()))
    proc = _cli(metrics, "--device_memory_gib", "16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# Wan run report") and "16.00 GiB per device (--device_memory_gib)" in proc.stdout
