"""The benches that compile for TPU slices run their --smoke modes (tests/test_benches.py has the others): each is
a file of its own so the two test workers share the suite's longest files evenly."""

import json
import re

import pytest
from conftest import LATENT_RTOL
from scripts import ROOT, run
from test_benches import needs_libtpu, numbers_by_key


@needs_libtpu
def test_tpu_compile_smoke():
    proc = run(ROOT / "bench" / "tpu_compile.py", "--smoke")
    assert proc.stdout.splitlines()[-1] == "cases 1 fits 1"
    assert "| tiny-random | v5e-4 | dp 2 x tp 2, megatron (default" in proc.stdout


@needs_libtpu
def test_sharding_compile_smoke():
    # the tiny step compiled for v5e-8 in both modes; the closed form must rank them as the compiler does
    proc = run(ROOT / "bench" / "sharding_compile.py", "--smoke")
    last = proc.stdout.splitlines()[-1].split()
    assert last[:4] == ["cases", "1", "auto_agrees", "1"] and last[4] == "worst_estimate_error", last
    assert "| tiny | v5e-8 | dp 2 x tp 4 | sequence |" in proc.stdout


@needs_libtpu
def test_tpu_conv_compile_smoke():
    last = run(ROOT / "bench" / "tpu_conv_compile.py", "--smoke").stdout.splitlines()[-1].split()
    assert last[0] == "conv3d_over_matmul" and float(last[1]) > 0 and last[2] == "conv3d_f32_s"


@needs_libtpu
def test_compile_time_smoke():
    # every program of the tiny model's text encoder and DiT compiled for v6e-1 in its own process, timed
    out = run(ROOT / "bench" / "compile_time.py", "--smoke").stdout
    last = out.splitlines()[-1].split()
    assert last[:2] == ["programs", "2"] and last[2] == "compile_s" and float(last[3]) > 0, out[-2000:]
    assert "| tiny | v6e-1 | transformer | step cfg=True |" in out


@needs_libtpu
def test_memory_per_program_smoke(tmp_path):
    # The tiny two-expert model in one process on v5e-4: encode, step, VAE decode, uint8, all fit; the step holds
    # the idle expert beside it, one expert's weights as its arguments.
    out = run(ROOT / "bench" / "memory_per_program.py", "--smoke", "--out", tmp_path).stdout
    assert out.splitlines()[-1] == "runs 1 fits 1 programs 4", out[-2000:]
    transformer = json.loads((tmp_path / "smoke.json").read_text())["stages"]["transformer"]
    idle, step = transformer["idle_expert_bytes_per_device"], transformer["compiled"][0]
    assert 0 < idle == transformer["weights_bytes_per_device"] / 2
    assert step["held_bytes"] >= idle


@needs_libtpu
def test_few_steps_smoke():
    # 50 guided steps (2 rows each) against 4 unguided ones (1 row per video): 25x the DiT flops per video by the
    # compiler's count (the uncond half dropped, not just steps); every sampler agrees with diffusers' run beside it
    out = run(ROOT / "bench" / "few_steps.py", "--smoke").stdout
    last = numbers_by_key(out.splitlines()[-1])
    assert last["flops_ratio"][0] == pytest.approx(25, rel=0.02), out[-2000:]
    errors = [float(e) for e in re.findall(r"latents rel (\S+?)[,\n]", out)]
    assert len(errors) == 4 and max(errors) <= LATENT_RTOL, out[-2000:]
