"""custom_splash_attention.py and the tuning helpers behind it."""

import json

from conftest import KERNEL_BF16_RTOL, KERNEL_F32_RTOL
from scripts import ROOT, run

from tpu_wan import attention_tuning as tuning
from tpu_wan.attention import AttentionOptions

CLI = ROOT / "custom_splash_attention.py"


def test_check_json_reports_errors_against_float64():
    proc = run(CLI, "check", "--heads", "2", "--q_len", "200", "--kv_len", "200", "--head_dim", "64",
               "--dtype", "bfloat16", "--block_q", "64", "--block_kv", "128", "--block_kv_compute", "64",
               "--window_size", "40", "--k_smooth", "--seed", "3", "--json")
    result = json.loads(proc.stdout)
    assert result["block_sizes"] == [64, 128, 64] and result["interpret"] is True
    assert 0 < result["rel_err"] <= KERNEL_BF16_RTOL and result["max_abs_err"] > 0


def test_check_refuses_a_window_on_cross_attention():
    proc = run(CLI, "check", "--q_len", "64", "--kv_len", "32", "--window_size", "4", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "expected q_len == kv_len, found 64 != 32" in proc.stderr


def test_check_fills_in_default_blocks():
    result = tuning.check(tuning.Shape(1, 40, 40, 64, "float32"), AttentionOptions(choice="custom"))
    assert result["block_sizes"] == [48, 128, 128]
    assert result["rel_err"] <= KERNEL_F32_RTOL


def test_bench_and_sweep_rows():
    shape = tuning.Shape(1, 64, 64, 64, "float32")
    rows = tuning.bench(shape, AttentionOptions(), choices=("custom", "xla"), repeats=1)
    assert [r["attention"] for r in rows] == ["custom", "xla"]
    assert all(r["seconds"] > 0 and r["tflops"] > 0 for r in rows)
    assert rows[0]["interpret"] is True and rows[1]["interpret"] is False
    swept = tuning.sweep(shape, AttentionOptions(), [(32, 64, 32), (64, 64, 64), (64, 48, 32)], repeats=1)
    assert {(r["bq"], r["bkv"], r["bkv_compute"]) for r in swept} == {(32, 64, 32), (64, 64, 64)}  # 48 % 32 != 0
    assert swept[0]["seconds"] <= swept[1]["seconds"]
