"""custom_splash_attention.py and the tuning helpers behind it."""

import json

import jax
import numpy as np
import pytest
from conftest import IDENTITY_RTOL, KERNEL_BF16_RTOL, KERNEL_F32_RTOL
from scripts import ROOT, load, run

from tpu_wan.cli import UsageError
from tpu_wan.kernels.splash_exp2 import attended_pairs
from tpu_wan.run import attention_tuning as tuning
from tpu_wan.runtime.attention import AttentionError, AttentionOptions

CLI = ROOT / "custom_splash_attention.py"


def test_check_json_reports_errors_against_float64():
    proc = run(CLI, "check", "--heads", "2", "--q_len", "200", "--kv_len", "200", "--head_dim", "64",
               "--dtype", "bfloat16", "--block_q", "64", "--block_kv", "128", "--block_kv_compute", "64",
               "--window_size", "40", "--k_smooth", "--seed", "3", "--repeats", "2", "--json")
    result = json.loads(proc.stdout)
    assert result["block_sizes"] == [64, 128, 64] and result["interpret"] is True
    assert result["seed"] == 3 and result["repeats"] == 2 and result["worst_seed"] in (3, 4)
    assert 0 < result["rel_err"] <= KERNEL_BF16_RTOL and result["max_abs_err"] > 0


def test_check_refuses_a_window_on_cross_attention():
    proc = run(CLI, "check", "--q_len", "64", "--kv_len", "32", "--window_size", "4", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "expected q_len == kv_len, found 64 != 32" in proc.stderr


def test_check_fills_in_default_blocks():
    result = tuning.check(tuning.Shape(1, 40, 40, 64, "float32"), AttentionOptions(choice="custom"))
    assert result["block_sizes"] == [48, 128, 128]
    assert result["rel_err"] <= KERNEL_F32_RTOL


def test_check_repeats_checks_that_many_seeded_inputs_and_reports_the_worst():
    shape, options = tuning.Shape(1, 40, 40, 64, "bfloat16"), AttentionOptions(choice="custom")
    singles = [tuning.check(shape, options, seed=s) for s in (5, 6, 7)]
    assert len({r["rel_err"] for r in singles}) == 3  # three different inputs
    result = tuning.check(shape, options, seed=5, repeats=3)
    assert result["seed"] == 5 and result["repeats"] == 3
    assert result["rel_err"] == max(r["rel_err"] for r in singles)
    assert result["max_abs_err"] == max(r["max_abs_err"] for r in singles)
    assert result["worst_seed"] == max(singles, key=lambda r: r["rel_err"])["seed"]


def test_repeats_and_seed_flags_are_refused_where_meaningless():
    parser = load(CLI)._parser()
    assert parser.parse_args(["check", "--repeats", "3"]).repeats == 3
    assert parser.parse_args(["check"]).repeats == 1 and parser.parse_args(["bench"]).repeats == 5
    with pytest.raises(UsageError, match="--repeats: expected a count >= 1, found 0"):
        parser.parse_args(["check", "--repeats", "0"])
    for flag in ("--seed", "--repeats"):  # compiling takes no inputs and times nothing
        with pytest.raises(UsageError, match=f"unrecognized arguments: {flag} 2"):
            parser.parse_args(["compile", "--topology", "v6e-8", flag, "2"])


def test_check_without_a_tpu_interprets_on_the_host_cpu(monkeypatch):
    # A GPU default backend refuses the Pallas TPU kernels in the dispatch; check runs them on the CPU backend.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    result = tuning.check(tuning.Shape(1, 40, 40, 64, "float32"), AttentionOptions(choice="custom", window_size=5))
    assert result["interpret"] is True and result["rel_err"] <= KERNEL_F32_RTOL


def test_bench_on_gpu_times_only_what_gpu_runs(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    rows, skipped = tuning.bench(tuning.Shape(1, 64, 64, 64, "float32"), AttentionOptions(), repeats=1)
    assert [r["attention"] for r in rows] == ["xla"]  # run on this CPU: the row logic, not a GPU timing
    reasons = {r["attention"]: r["reason"] for r in skipped}
    assert set(reasons) == {"custom", "splash", "cudnn"}
    assert "Pallas TPU kernel" in reasons["custom"] and "found float32" in reasons["cudnn"]
    with pytest.raises(AttentionError, match="nothing to time on gpu"):
        tuning.bench(tuning.Shape(1, 64, 64, 64, "float32"), AttentionOptions(), choices=("custom",), repeats=1)


def test_peak_tflops_of_every_tpu_generation_and_gpus():
    from tpu_wan.tpu.topology import GENERATIONS

    peaks = {key: tuning.peak_tflops(gen.device_kind) for key, gen in GENERATIONS.items()}
    assert peaks == {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}  # jax names v5p "TPU v5"
    assert tuning.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and tuning.peak_tflops("cpu") is None


def test_flops_count_the_window():
    shape = tuning.Shape(2, 300, 300, 64)
    assert shape.flops() == 4 * 2 * 300 * 300 * 64
    assert shape.flops(50) == 4 * 2 * attended_pairs(300, 300, 50) * 64 < shape.flops() / 2
    with pytest.raises(AttentionError, match="found 300 != 77"):
        tuning.Shape(2, 300, 77, 64).flops(50)


def test_bench_and_sweep_rows():
    shape = tuning.Shape(1, 64, 64, 64, "float32")
    rows, skipped = tuning.bench(shape, AttentionOptions(), choices=("custom", "xla", "cudnn"), repeats=1)
    assert [r["attention"] for r in rows] == ["custom", "xla"]
    assert skipped == [{"attention": "cudnn", "reason": "cuDNN attention needs a GPU, found cpu"}]
    assert all(r["seconds"] > 0 and r["tflops"] > 0 for r in rows)
    assert rows[0]["interpret"] is True and rows[1]["interpret"] is False
    swept, refused = tuning.sweep(shape, AttentionOptions(), [(32, 64, 32), (64, 48, 32), (64, 64, 64)], repeats=1)
    assert {(r["bq"], r["bkv"], r["bkv_compute"]) for r in swept} == {(32, 64, 32), (64, 64, 64)}
    assert swept[0]["seconds"] <= swept[1]["seconds"]
    # a refused candidate is listed and the sweep goes on to the next
    assert [(r["bq"], r["bkv"], r["bkv_compute"]) for r in refused] == [(64, 48, 32)]
    assert "multiple of --bkvcomputesize" in refused[0]["reason"]
    with pytest.raises(AttentionError, match=r"none of the 2 candidate block sizes fits; first refusal \(64, 48, 32\)"):
        tuning.sweep(shape, AttentionOptions(), [(64, 48, 32), (64, 64, 24)], repeats=1)


def test_bench_and_sweep_inputs_come_from_the_seed(monkeypatch):
    seen = []  # the inputs of each timed call, flattened

    def record(fn, args, repeats):
        seen.append(np.concatenate([np.asarray(a, np.float32).ravel() for a in args]))
        return 1.0  # seconds: nothing is run or timed

    monkeypatch.setattr(tuning, "time_call", record)
    shape = tuning.Shape(1, 64, 64, 64, "float32")
    for seed in (1, 1, 2):
        tuning.bench(shape, AttentionOptions(), choices=("xla",), repeats=1, seed=seed)
        tuning.sweep(shape, AttentionOptions(), [(64, 64, 64)], repeats=1, seed=seed)
    bench_1, sweep_1, bench_1_again, sweep_1_again, bench_2, sweep_2 = seen
    assert all(np.array_equal(bench_1, x) for x in (sweep_1, bench_1_again, sweep_1_again))
    assert np.array_equal(bench_2, sweep_2) and not np.array_equal(bench_1, bench_2)


TINY = ("--heads", "1", "--q_len", "64", "--kv_len", "64", "--head_dim", "64", "--dtype", "float32", "--repeats", "1")


def test_bench_command_json():
    proc = run(CLI, "bench", *TINY, "--window_size", "8", "--seed", "7", "--json")
    result = json.loads(proc.stdout)
    assert result["seed"] == 7
    assert [r["attention"] for r in result["results"]] == ["custom", "splash", "xla"]
    assert result["skipped"] == [{"attention": "cudnn", "reason": "cuDNN attention needs a GPU, found cpu"}]
    flops = 4 * attended_pairs(64, 64, 8) * 64  # the window's pairs only
    for row in result["results"]:
        assert abs(row["tflops"] * row["seconds"] * 1e12 / flops - 1) < IDENTITY_RTOL


def test_sweep_command_json_and_table():
    choices = ("--bq_choices", "32", "64", "--bkv_choices", "64", "--bkv_compute_choices", "64", "24")
    result = json.loads(run(CLI, "sweep", *TINY, *choices, "--seed", "7", "--json").stdout)
    assert result["seed"] == 7
    timed = [(r["bq"], r["bkv"], r["bkv_compute"]) for r in result["results"]]
    assert sorted(timed) == [(32, 64, 64), (64, 64, 64)]  # 64 % 24 != 0: skipped
    assert result["best"] == result["results"][0]
    lines = run(CLI, "sweep", *TINY, "--bq_choices", "32", "64", "--bkv_choices", "64",
                "--bkv_compute_choices", "64").stdout.splitlines()
    assert lines[0].split()[0] == "best" and lines[1].startswith("*") and not lines[2].startswith("*")
    assert lines[-1].startswith("best: --bqsize ") and "--bkvsize 64 --bkvcomputesize 64" in lines[-1]


def test_sweep_command_with_nothing_that_fits():
    proc = run(CLI, "sweep", "--q_len", "8192", "--kv_len", "8192", "--bq_choices", "4096", "--bkv_choices", "8192",
               "--bkv_compute_choices", "2048", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "none of the 1 candidate block sizes fits" in proc.stderr and "VMEM limit of 16777216 bytes" in proc.stderr
