"""The three stage scripts as separate processes == generate_flax.py in one process, bit for bit."""

import hashlib
import time

import numpy as np
import pytest
from conftest import TIME_ACCOUNTING_RTOL
from scripts import GENERATE, STAGE1, STAGE2, STAGE3, MESH_2x4, run

from tpu_wan.core import artifacts, video
from tpu_wan.run import pipeline

PROMPT = "A robot dancing on a rooftop at sunset"
SIZE = ("--height", "32", "--width", "48", "--frames", "9", "--num_inference_steps", "4", "--seed", "7")


_process_seconds = {}  # stage -> wall time of its process, timed from outside


@pytest.fixture(scope="module")
def staged(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("staged")
    for stage, script, args in (
        ("text_encoder", STAGE1, ("--model_id", "tiny-random", "--prompt", PROMPT, "--output_dir", out)),
        ("transformer", STAGE2, ("--input_dir", out, *SIZE)),
        ("vae", STAGE3, ("--input_dir", out, "--save_frames")),
    ):
        start = time.perf_counter()
        run(script, *args, *MESH_2x4)
        _process_seconds[stage] = time.perf_counter() - start
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("one_process")
    run(GENERATE, "--model_id", "tiny-random", "--prompt", PROMPT, *SIZE, *MESH_2x4, "--warmup_steps", "1",
        "--output_video", out / "video.mp4", "--save_intermediates", out)
    return out


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_staged_equals_one_process(staged, one_process):
    for a, b in zip(artifacts.load_embeddings(staged), artifacts.load_embeddings(one_process)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        artifacts.load_latents(staged / artifacts.LATENTS_FILE),
        artifacts.load_latents(one_process / artifacts.LATENTS_FILE),
    )
    np.testing.assert_array_equal(artifacts.load_frames(staged), artifacts.load_frames(one_process))


def test_videos_are_playable(staged, one_process):
    for path in (staged / artifacts.VIDEO_FILE, one_process / "video.mp4"):
        frames, fps = video.read_video(path)
        assert frames.shape == (9, 32, 48, 3) and fps == 16


def test_config_records_every_setting(staged):
    cfg = artifacts.load_config(staged)
    assert cfg["prompts"] == [PROMPT] and cfg["model_id"] == "tiny-random"
    assert (cfg["height"], cfg["width"], cfg["frames"], cfg["num_inference_steps"], cfg["seeds"]) == (32, 48, 9, 4, [7])
    assert cfg["flow_shift"] == 3.0 and cfg["sample_solver"] == "unipc" and cfg["mesh"] == [2, 4]


def test_stage2_is_deterministic(staged, tmp_path):
    # The same settings again (in this process, the same 2x4 mesh of 8 CPU devices): the same bytes.
    sampling = pipeline.Stage2Settings(height=32, width=48, frames=9, num_inference_steps=4, seeds=(7,))
    pipeline.run_stage2(staged, sampling, output_dir=tmp_path, dp=2, tp=4)
    assert _sha(tmp_path / artifacts.LATENTS_FILE) == _sha(staged / artifacts.LATENTS_FILE)


def test_each_stage_adds_its_metrics(staged):
    m = artifacts.load_metrics(staged / artifacts.METRICS_FILE)
    assert m["script"] == "stages" and list(m["stages"]) == ["text_encoder", "transformer", "vae"]
    for name, s in m["stages"].items():
        # What a stage says it took fits inside its process's lifetime measured here (imports come on top).
        assert 0 < s["wall_s"] < _process_seconds[name], (name, s["wall_s"], _process_seconds[name])
        sections = s["load_s"] + s["warmup_s"] + sum(s["run_s"]) + s["io_s"]
        # Each stage's sections cover its run up to set-up in milliseconds (see test_metrics.py).
        assert abs(sections - s["wall_s"]) <= TIME_ACCOUNTING_RTOL * s["wall_s"], (name, sections, s["wall_s"])
        assert s["weights_bytes"] > 0 and s["compilations"] > 0
    assert m["stages"]["transformer"]["steps"] == 4


@pytest.mark.parametrize("platforms", [None, "tpu"])
def test_the_first_log_line_names_the_backend(platforms, tmp_path, tiny_path):
    """A run's log starts with the backend jax picked (no private hardware scan), and what libtpu prints while it
    looks for a chip this host does not have stays off the terminal; a backend asked for that cannot start is
    one line."""
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    if platforms:
        env["JAX_PLATFORMS"] = platforms
    proc = subprocess.run([sys.executable, str(STAGE1), "--model_id", "tiny-random", "--prompt", "a cat",
                           "--output_dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    lines = proc.stderr.splitlines()
    if platforms is None:  # this host has no accelerator
        assert proc.returncode == 0, proc.stderr
        assert re.match(r"INFO tpu_wan: backend cpu: \d+ x cpu \(no TPU or GPU found on this host", lines[0]), lines
        assert lines[1].startswith("INFO tpu_wan: loading the text encoder"), lines
        assert all(line.startswith("INFO tpu_wan:") for line in lines), lines  # nothing from libtpu
    else:
        assert proc.returncode == 2 and len(lines) == 1, lines
        assert ("JAX_PLATFORMS=tpu: expected that backend to start, found: Unable to initialize backend 'tpu'"
                in lines[0])
        assert not list(tmp_path.iterdir())
