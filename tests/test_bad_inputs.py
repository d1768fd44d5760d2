"""Bad input: one line on stderr naming expected vs found, exit status 2, no traceback, folder untouched."""

import hashlib

import numpy as np
import pytest
import safetensors.numpy
from scripts import GENERATE, MESH_2x4, STAGE1, STAGE2, STAGE3, run

from tpu_wan import artifacts

SIZE = ("--height", "32", "--width", "32", "--frames", "5", "--num_inference_steps", "2")


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("stage1")
    run(STAGE1, "--model_id", "tiny-random", "--prompt", "a cat", "--output_dir", out, *MESH_2x4)
    return out


def _snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _refused(script, *args, folder, expect):
    before = _snapshot(folder)
    proc = run(script, *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in expect:
        assert fragment in lines[0], lines[0]
    assert _snapshot(folder) == before


def _copy_stage1(stage1_dir, dst):
    for p in stage1_dir.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize(
    "flags, expect",
    [
        (("--frames", "8"), ["frames must be 4n+1", "found 8"]),
        (("--height", "100"), ["height must be a positive multiple of 16", "found 100"]),
        (("--width", "0"), ["width", "found 0"]),
        (("--num_inference_steps", "0"), ["num_inference_steps must be >= 1", "found 0"]),
        (("--sample_solver", "ddim"), ["invalid choice: 'ddim'"]),
        (("--guidance_scale", "-1"), ["guidance_scale must be >= 0", "found -1.0"]),
    ],
    ids=["frames", "height", "width", "steps", "solver", "guidance"],
)
def test_stage2_bad_flags(stage1_dir, flags, expect):
    args = dict(zip(SIZE[::2], SIZE[1::2])) | dict(zip(flags[::2], flags[1::2]))
    _refused(STAGE2, "--input_dir", stage1_dir, *[x for kv in args.items() for x in kv], folder=stage1_dir,
             expect=expect)


def test_generate_bad_frames(tmp_path):
    _refused(GENERATE, "--model_id", "tiny-random", "--frames", "6", "--output_video", tmp_path / "v.mp4",
             folder=tmp_path, expect=["frames must be 4n+1", "found 6"])


def test_stage2_missing_stage1(tmp_path):
    _refused(STAGE2, "--input_dir", tmp_path, *SIZE, folder=tmp_path,
             expect=["generation_config.json", "run stage 1 first"])


def test_stage3_missing_latents(stage1_dir):
    _refused(STAGE3, "--input_dir", stage1_dir, folder=stage1_dir,
             expect=[artifacts.LATENTS_FILE, "run stage 2 first"])


def test_stage2_wrong_embedding_keys(stage1_dir, tmp_path):
    folder = _copy_stage1(stage1_dir, tmp_path)
    safetensors.numpy.save_file({"embeds": np.zeros((1, 512, 32), np.float32)}, folder / artifacts.EMBEDDINGS_FILE)
    _refused(STAGE2, "--input_dir", folder, *SIZE, folder=folder, expect=["expected", "found"])


def test_stage2_embeddings_from_another_model(stage1_dir, tmp_path):
    folder = _copy_stage1(stage1_dir, tmp_path)
    wrong = np.zeros((1, 512, 48), np.float32)  # text dim 48, the tiny transformer expects 32
    artifacts.save_embeddings(folder, wrong, wrong)
    _refused(STAGE2, "--input_dir", folder, *SIZE, folder=folder, expect=["expected shape (1, 512, 32)", "(1, 512, 48)"])


def test_stage2_init_latents_wrong_shape(stage1_dir, tmp_path):
    folder = _copy_stage1(stage1_dir, tmp_path)
    bad = folder / "init.safetensors"
    safetensors.numpy.save_file({"latents": np.zeros((1, 16, 3, 4, 4), np.float32)}, bad)
    _refused(STAGE2, "--input_dir", folder, *SIZE, "--init_latents", bad, folder=folder,
             expect=["expected shape (1, 16, 2, 4, 4)", "found (1, 16, 3, 4, 4)"])


@pytest.mark.parametrize(
    "mesh, expect",
    [
        (("--dp", "3", "--tp", "2"), ["dp x tp must equal the 8 available devices", "dp=3 tp=2"]),
        (("--dp", "1", "--tp", "8"), ["tp must divide the 4 attention heads", "tp=8"]),
    ],
    ids=["does-not-fit-devices", "tp-does-not-divide-heads"],
)
def test_stage1_bad_mesh(tmp_path, mesh, expect):
    _refused(STAGE1, "--model_id", "tiny-random", "--output_dir", tmp_path, "--cpu_devices", "8", *mesh,
             folder=tmp_path, expect=expect)


def test_stage1_unknown_model_folder(tmp_path):
    _refused(STAGE1, "--model_id", str(tmp_path / "nowhere"), "--output_dir", tmp_path, folder=tmp_path,
             expect=["model_id", "nowhere"])
