"""A stage stopped in the middle of writing an artifact: the previous artifact stays intact and loadable;
Ctrl-C and SIGTERM also leave no temporary file behind."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from scripts import ROOT, STAGE1, run

from tpu_wan.core import artifacts

ARGS = ("--model_id", "tiny-random", "--max_sequence_length", "16", "--cpu_devices", "1")


@pytest.fixture(scope="module")
def previous(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("previous")
    run(STAGE1, *ARGS, "--prompt", "the first prompt", "--output_dir", out)
    return out


def _stopped_mid_write(folder, sig) -> subprocess.CompletedProcess:
    """Stage 1 again with another prompt, stopped by `sig` while its embeddings sit in a finished temp file."""
    env = dict(os.environ, TPU_WAN_STALL_BEFORE_RENAME=artifacts.EMBEDDINGS_FILE)
    proc = subprocess.Popen([sys.executable, str(STAGE1), *ARGS, "--prompt", "a second prompt", "--output_dir",
                             str(folder)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # until the stage says it stalls with the temp file written (or ends)
        seen.append(line)
        if line.startswith("stalled before renaming"):
            break
    else:
        raise AssertionError(f"stage 1 ended before stalling: {''.join(seen)}")
    assert list(folder.glob(f".{artifacts.EMBEDDINGS_FILE}.*"))
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(seen) + err)


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_sigkill_keeps_the_previous_artifact(previous, tmp_path):
    folder = _copy(previous, tmp_path / "run")
    before = (folder / artifacts.EMBEDDINGS_FILE).read_bytes()
    proc = _stopped_mid_write(folder, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert (folder / artifacts.EMBEDDINGS_FILE).read_bytes() == before
    for ours, old in zip(artifacts.load_embeddings(folder), artifacts.load_embeddings(previous)):
        np.testing.assert_array_equal(ours, old)
    assert artifacts.load_config(folder)["prompts"] == ["the first prompt"]


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupt_leaves_no_temp_files(previous, tmp_path, sig, status):
    folder = _copy(previous, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    proc = _stopped_mid_write(folder, sig)
    assert proc.returncode == status, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("interrupted" if sig == signal.SIGINT else "terminated")
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temp file, nothing changed
