"""Every benchmark in bench/ runs its --smoke mode: the same code path at tiny sizes, so none breaks unseen."""

import importlib.util
import math
import re
import sys

import pytest
from conftest import BF16_MIN_SHARE, BF16_OVER_DIFFUSERS
from scripts import ROOT, load, run

# bench -> (keys of its last line with how many numbers follow each, patterns of lines its output must hold).
BENCHES = {
    "cold_start.py": ({"tiny_cold_over_warm": 1}, ()),
    # Both paths load and run their steps to finite latents.
    "real_size.py": ({"peak_rss_over_weights": 1},
                     (r"^ours: baseline .* finite=True$", r"^naive: baseline .* finite=True$")),
    "vae_decode.py": ({"ratio_9f_128": 1, "compile_ratio_17_5": 1}, ()),
    "dit_step.py": ({"ratio_fp32": 1, "ratio_bf16": 1}, ()),
    "conv3d.py": ({"xla_over_torch": 3}, ()),
}


def numbers_by_key(line: str) -> dict[str, list[float]]:
    """'a 1.5 b 2 3' -> {'a': [1.5], 'b': [2.0, 3.0]}"""
    out, key = {}, None
    for word in line.split():
        try:
            value = float(word)
        except ValueError:
            key = word
            out[key] = []
        else:
            out.setdefault(key, []).append(value)
    return out


# Benches that time one process's own work run in this process (main() with --smoke); the others start
# processes of their own (cold starts, peak RSS per path) and run as scripts.
IN_PROCESS = ("vae_decode.py", "dit_step.py", "conv3d.py")


def _smoke_output(bench: str, monkeypatch, capsys) -> str:
    if bench not in IN_PROCESS:
        return run(ROOT / "bench" / bench, "--smoke").stdout
    monkeypatch.setattr(sys, "argv", [bench, "--smoke"])
    load(ROOT / "bench" / bench).main()
    return capsys.readouterr().out


@pytest.mark.parametrize("bench", list(BENCHES))
def test_bench_smoke(bench, monkeypatch, capsys):
    keys, expected_lines = BENCHES[bench]
    out = _smoke_output(bench, monkeypatch, capsys)
    last = numbers_by_key(out.splitlines()[-1])
    assert {key: len(values) for key, values in last.items()} == keys, out[-2000:]
    assert all(math.isfinite(v) and v >= 0 for values in last.values() for v in values), last
    for pattern in expected_lines:
        assert re.search(pattern, out, re.MULTILINE), pattern


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: nothing can compile for a TPU on this host")


@needs_libtpu
def test_kernel_vmem_smoke():
    # the estimate the kernel asks Mosaic for is at least what Mosaic needs (measured 1.42x on the smoke's shape)
    last = run(ROOT / "bench" / "kernel_vmem.py", "--smoke").stdout.splitlines()[-1].split()
    assert last[:3] == ["rows", "5", "estimate_over_needed_min"] and float(last[3]) >= 1, last


def test_startup_smoke():
    last = run(ROOT / "bench" / "startup.py", "--smoke").stdout.splitlines()[-1].split()
    assert last[0] == "with_over_without" and float(last[1]) > 0
    assert last[2:4] == ["with_stderr_lines", "0"]


def test_gpu_real_smoke():
    out = run(ROOT / "bench" / "gpu_real.py", "--smoke").stdout
    last = numbers_by_key(out.splitlines()[-1])
    assert {key: len(values) for key, values in last.items()} == {"ratio_eager": 1, "ratio_compiled": 1}, out[-2000:]
    assert all(math.isfinite(v) and v > 0 for values in last.values() for v in values), last
    rows = {line.split()[0]: line.split() for line in out.splitlines() if re.match(r"^(ours|eager|compiled) +\d", line)}
    assert set(rows) == {"ours", "eager", "compiled"}, out[-2000:]
    # Each side's bf16 guided velocity against diffusers' float32 one, as test_bf16_parity measures the pipeline:
    # ours within BF16_OVER_DIFFUSERS of diffusers' own bf16 error, and really in bf16 (measured 1.015 here).
    errors = {side: float(row[-1]) for side, row in rows.items()}
    assert errors["eager"] == errors["compiled"] and 1e-3 < errors["eager"] < 0.1, errors  # the same torch math
    ratio = float(re.search(r"ours / diffusers eager ([\d.]+)", out).group(1))
    assert BF16_MIN_SHARE <= ratio <= BF16_OVER_DIFFUSERS and ratio == pytest.approx(
        errors["ours"] / errors["eager"], rel=1e-2), (ratio, errors)
    assert re.search(r"^VAE decode of \(1, 16, 2, 8, 8\) \(float32\): ours [\d.]+ s .* diffusers [\d.]+ s", out, re.M)
