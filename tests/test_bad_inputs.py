"""Bad input: one line on stderr naming expected vs found, exit status 2, no traceback, folder untouched."""

import hashlib
import json
import pickle
import sys

import numpy as np
import pytest
import safetensors.numpy
from scripts import GENERATE, STAGE1, STAGE2, STAGE3, MESH_2x4, run

from tpu_wan.core import artifacts
from tpu_wan.core.config import DEFAULT_NEGATIVE_PROMPT
from tpu_wan.run import pipeline

SIZE = ("--height", "32", "--width", "32", "--frames", "5", "--num_inference_steps", "2")


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory, tiny_path):
    """A good stage-1 folder, made in this process (the refusals below are what runs as scripts)."""
    out = tmp_path_factory.mktemp("stage1")
    pipeline.run_stage1("tiny-random", ["a cat"], DEFAULT_NEGATIVE_PROMPT, out, dp=2, tp=4)
    return out


def _snapshot(folder):
    """Every path under `folder` (hidden temp files included) with its content hash."""
    return {str(p.relative_to(folder)): p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


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
        (("--seeds", "5-1"), ["seeds", "5-1"]),
        (("--batch_size", "0"), ["--batch_size must be >= 1", "found 0"]),
        (("--attention", "flash"), ["invalid choice: 'flash'"]),
        (("--warmup_steps", "-1"), ["--warmup_steps must be >= 0", "found -1"]),
        (("--bogus", "1"), ["unrecognized arguments: --bogus"]),
        (("--guidance_scale_2", "3"), ["--guidance_scale_2: expected a two-expert model (model_index.json with "
                                       "transformer_2 and boundary_ratio", "found tiny-random with one transformer"]),
        (("--boundary_ratio", "1.5"), ["--boundary_ratio must be in [0, 1], found 1.5"]),
    ],
    ids=["frames", "height", "width", "steps", "solver", "guidance", "seeds", "batch-size", "attention", "warmup",
         "unknown-flag", "wan21-guidance-2", "boundary"],
)
def test_stage2_bad_flags(stage1_dir, flags, expect):
    args = dict(zip(SIZE[::2], SIZE[1::2])) | dict(zip(flags[::2], flags[1::2]))
    _refused(STAGE2, "--input_dir", stage1_dir, *[x for kv in args.items() for x in kv], folder=stage1_dir,
             expect=expect)


@pytest.mark.parametrize(
    "flags, expect",
    [
        (("--denoising_steps", "1000", "500"), ["--denoising_steps: expected --sample_solver distill or distill_euler, "
                                                "found --sample_solver unipc"]),
        (("--sample_solver", "distill", "--denoising_steps", "500", "750"),
         ["--denoising_steps: expected strictly decreasing whole numbers in 1..1000, found 500 750"]),
        (("--sample_solver", "distill_euler", "--denoising_steps", "1000", "0"),
         ["--denoising_steps: expected strictly decreasing whole numbers in 1..1000, found 1000 0"]),
        (("--sample_solver", "distill", "--num_inference_steps", "6"),
         ["--num_inference_steps: expected 4 with --sample_solver distill (the length of --denoising_steps 1000 750 "
          "500 250), found 6"]),
    ],
    ids=["steps-without-distill", "increasing", "zero", "step-count"],
)
def test_stage2_bad_distill_flags(stage1_dir, flags, expect):
    _refused(STAGE2, "--input_dir", stage1_dir, "--height", "32", "--width", "32", "--frames", "5", *flags,
             folder=stage1_dir, expect=expect)


@pytest.mark.parametrize(
    "flags, expect",
    [
        (("--cache", "teacache:0.1"), ["--cache: expected first_block:THRESHOLD, mag:THRESHOLD:RATIOS",
                                       "found 'teacache:0.1'"]),
        (("--cache", "mag:0.06"), ["--cache mag: expected the model's magnitude ratios", "found none"]),
        (("--cache", "first_block:0.05", "--sample_solver", "distill"),
         ["--cache: expected a full-step solver", "found --sample_solver distill"]),
    ],
    ids=["unknown-kind", "mag-without-ratios", "distill"],
)
def test_stage2_bad_cache(stage1_dir, flags, expect):
    _refused(STAGE2, "--input_dir", stage1_dir, "--height", "32", "--width", "32", "--frames", "5", *flags,
             folder=stage1_dir, expect=expect)


def test_stage2_kernel_flag_that_would_do_nothing(stage1_dir):
    _refused(STAGE2, "--input_dir", stage1_dir, *SIZE, "--attention", "xla", "--k_smooth", folder=stage1_dir,
             expect=["--k_smooth acts on our kernel only", "found --attention xla"])


def test_stage2_lora_refusals(stage1_dir, tmp_path):
    import safetensors.torch
    import torch

    _refused(STAGE2, "--input_dir", stage1_dir, *SIZE, "--lora", tmp_path / "none.safetensors:0.5", folder=stage1_dir,
             expect=["--lora: expected a file, found nothing at", "none.safetensors"])
    stray = tmp_path / "stray.safetensors"  # adapts a block the two-block tiny model does not have
    safetensors.torch.save_file({"transformer.blocks.7.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
                                 "transformer.blocks.7.attn1.to_q.lora_B.weight": torch.zeros(32, 4)}, stray)
    _refused(STAGE2, "--input_dir", stage1_dir, *SIZE, "--lora", stray, folder=stage1_dir,
             expect=["stray.safetensors: blocks.7.attn1.to_q: expected a Linear layer of the transformer"])
    _refused(STAGE2, "--input_dir", stage1_dir, *SIZE, "--lora_2", stray, folder=stage1_dir,
             expect=["--lora_2: expected a two-expert model", "found tiny-random with one transformer"])


def test_stage2_expert_offload_without_experts(stage1_dir):
    _refused(STAGE2, "--input_dir", stage1_dir, *SIZE, "--expert_offload", folder=stage1_dir,
             expect=["--expert_offload: expected a two-expert model", "found tiny-random with one transformer"])


@pytest.mark.parametrize("flag, value", [("--height", "48"), ("--width", "80")])
def test_generate_ti2v_size_off_its_stride(tmp_path, flag, value):
    sizes = dict(zip(SIZE[::2], SIZE[1::2])) | {flag: value}
    _refused(GENERATE, "--model_id", "tiny-random-ti2v", *[x for kv in sizes.items() for x in kv], "--output_video",
             tmp_path / "v.mp4", folder=tmp_path,
             expect=[f"{flag} must be a multiple of 32 for tiny-random-ti2v (its VAE compresses 16x and its "
                     f"transformer patches 2x2), found {value}"])


def test_generate_bad_fps(tmp_path):
    # --fps defaults to the model's; an explicit 0 is refused, not taken for "unset"
    _refused(GENERATE, "--model_id", "tiny-random", *SIZE, "--fps", "0", "--output_video", tmp_path / "v.mp4",
             folder=tmp_path, expect=["fps must be > 0", "found 0"])


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


def test_stage1_empty_prompt_file(tmp_path):
    (tmp_path / "prompts.txt").write_text("# only a comment\n\n", encoding="utf-8")
    _refused(STAGE1, "--model_id", "tiny-random", "--prompt_file", tmp_path / "prompts.txt", "--output_dir",
             tmp_path / "out", folder=tmp_path, expect=["prompts.txt", "expected at least one prompt line, found none"])


def test_stage1_bad_max_sequence_length(tmp_path):
    _refused(STAGE1, "--model_id", "tiny-random", "--max_sequence_length", "0", "--output_dir", tmp_path / "out",
             "--cpu_devices", "1", folder=tmp_path, expect=["max_sequence_length must be >= 1", "found 0"])


@pytest.mark.parametrize(
    "flags, expect",
    [
        (("--coordinator_address", "localhost:1234"), ["expected all three or none", "found 1"]),
        (("--coordinator_address", "localhost:1234", "--num_processes", "2", "--process_id", "2"),
         ["--process_id must be in [0, 2)", "found 2"]),
    ],
    ids=["coordinator-alone", "process-id-out-of-range"],
)
def test_stage1_bad_distributed_flags(tmp_path, flags, expect):
    _refused(STAGE1, "--model_id", "tiny-random", "--output_dir", tmp_path / "out", "--cpu_devices", "1", *flags,
             folder=tmp_path, expect=expect)


def test_stage2_nan_embeddings(stage1_dir, tmp_path):
    folder = _copy_stage1(stage1_dir, tmp_path)
    prompt, negative = artifacts.load_embeddings(folder)
    prompt = prompt.copy()
    prompt[0, 0, 0] = np.nan
    artifacts.save_embeddings(folder, prompt, negative, metadata={"model_id": "tiny-random"})
    _refused(STAGE2, "--input_dir", folder, *SIZE, folder=folder,
             expect=[artifacts.EMBEDDINGS_FILE, "expected finite values", "found 1 NaN or Inf", "rerun stage 1"])


def test_stage2_embeddings_of_another_model_id(stage1_dir, tmp_path):
    folder = _copy_stage1(stage1_dir, tmp_path)
    artifacts.save_embeddings(folder, *artifacts.load_embeddings(folder), metadata={"model_id": "some/other-model"})
    _refused(STAGE2, "--input_dir", folder, *SIZE, folder=folder,
             expect=["expected embeddings from 'tiny-random'", "found 'some/other-model'"])


def test_stage2_config_of_a_future_version(stage1_dir, tmp_path):
    folder = _copy_stage1(stage1_dir, tmp_path)
    cfg = json.loads((folder / artifacts.CONFIG_FILE).read_text())
    (folder / artifacts.CONFIG_FILE).write_text(json.dumps(cfg | {"schema_version": 99}))
    _refused(STAGE2, "--input_dir", folder, *SIZE, folder=folder, expect=["expected schema_version 1", "found 99"])


def test_stage2_pickled_checkpoint_is_not_executed(stage1_dir, tmp_path):
    import torch

    folder = _copy_stage1(stage1_dir, tmp_path)
    marker = tmp_path / "pwned"
    # The payload is live: unpickled the unsafe way, it creates its marker file.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    torch.save({"generator": _Payload(marker)}, folder / "evil.pt")  # unpickling it would create `marker`
    _refused(STAGE2, "--input_dir", folder, *SIZE, "--transformer_checkpoint", folder / "evil.pt", folder=folder,
             expect=["evil.pt", "weights"])
    assert not marker.exists()


class _Payload:
    """Unpickling it touches `marker` (what a malicious checkpoint could do with any call)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def stage2_dir(stage1_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2")
    sampling = pipeline.Stage2Settings(height=32, width=32, frames=5, num_inference_steps=2)
    pipeline.run_stage2(stage1_dir, sampling, output_dir=out, dp=2, tp=4)
    return out


def _copy_tree(src, dst):
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_stage3_nan_latents(stage2_dir, tmp_path):
    folder = _copy_tree(stage2_dir, tmp_path)
    latents = artifacts.load_latents(folder / artifacts.LATENTS_FILE)
    latents[..., 0] = np.inf  # 1 x 16 x 2 x 4 of the [1, 16, 2, 4, 4] values
    artifacts.save_latents(folder / artifacts.LATENTS_FILE, latents)
    _refused(STAGE3, "--input_dir", folder, folder=folder,
             expect=[artifacts.LATENTS_FILE, "expected finite values", "found 128 NaN or Inf", "rerun stage 2"])


def test_stage3_latents_of_another_size(stage2_dir, tmp_path):
    folder = _copy_tree(stage2_dir, tmp_path)
    artifacts.save_latents(folder / artifacts.LATENTS_FILE, np.zeros((1, 16, 2, 8, 8), np.float32))
    _refused(STAGE3, "--input_dir", folder, folder=folder,
             expect=["expected shape (1, 16, 2, 4, 4) for 32x32x5", "found (1, 16, 2, 8, 8)"])


def test_stage3_bad_fps(stage2_dir, tmp_path):
    folder = _copy_tree(stage2_dir, tmp_path)
    _refused(STAGE3, "--input_dir", folder, "--fps", "0", folder=folder, expect=["--fps must be > 0", "found 0"])


def test_stage3_unknown_vae_conv(stage2_dir, tmp_path):
    folder = _copy_tree(stage2_dir, tmp_path)
    _refused(STAGE3, "--input_dir", folder, "--vae_conv", "cudnn", folder=folder, expect=["invalid choice: 'cudnn'"])


def test_generate_bad_iterations(tmp_path):
    _refused(GENERATE, "--model_id", "tiny-random", "--num_iterations", "0", "--output_video", tmp_path / "v.mp4",
             folder=tmp_path, expect=["--num_iterations must be >= 1", "found 0"])


def test_generate_missing_checkpoint(tmp_path):
    _refused(GENERATE, "--model_id", "tiny-random", *SIZE, "--transformer_checkpoint", tmp_path / "ft.safetensors",
             "--output_video", tmp_path / "v.mp4", "--cpu_devices", "1", folder=tmp_path,
             expect=["ft.safetensors"])


def test_stage2_attention_refused_before_overwriting(stage1_dir, stage2_dir, tmp_path):
    folder = _copy_tree(stage2_dir, tmp_path)
    # A key block that is not a multiple of the default compute block for these short sequences (128): refused
    # when the step's attention is traced, which happens before --overwrite removes or rewrites anything.
    _refused(STAGE2, "--input_dir", stage1_dir, "--output_dir", folder, *SIZE, *MESH_2x4, "--overwrite",
             "--attention", "custom",
             "--bkvsize", "96", folder=folder, expect=["--bkvsize 96", "bkv=96 must be a multiple of bkv_compute=128"])


def test_stage2_unreadable_checkpoint(stage1_dir, tmp_path):
    folder = _copy_stage1(stage1_dir, tmp_path)
    (folder / "ft.safetensors").write_bytes(b"not a safetensors file")
    _refused(STAGE2, "--input_dir", folder, *SIZE, "--transformer_checkpoint", folder / "ft.safetensors",
             folder=folder, expect=["ft.safetensors", "expected a safetensors file, found unreadable data"])


def test_stage1_hub_id_without_hub(tmp_path, monkeypatch):
    # A hub-style id that is no local folder, with no hub to reach (offline, empty hub cache): refused at once,
    # naming the id and the folder that does not exist, not a download traceback.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    out = tmp_path / "out"
    out.mkdir()
    _refused(STAGE1, "--model_id", "tpu-wan-test/no-such-model", "--output_dir", out, folder=out,
             expect=["model_id 'tpu-wan-test/no-such-model'", "tpu-wan-test/no-such-model does not exist",
                     "HF_HUB_OFFLINE"])


def test_a_missing_dependency_is_one_line(monkeypatch, capsys):
    # e.g. a GPU image without diffusers: an entry point says which package, in one line, status 2
    from tpu_wan.core import entry

    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ModuleNotFoundError

    def main(argv):
        from diffusers import WanTransformer3DModel  # noqa: F401

    assert entry.run_main(main, []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected the Python package diffusers installed" in err[0], err
    assert "found no module 'diffusers'" in err[0]

    def buggy(argv):  # a module that is not a dependency is a bug: its traceback is kept
        import tpu_wan.no_such_module  # noqa: F401

    with pytest.raises(ModuleNotFoundError):
        entry.run_main(buggy, [])


def test_a_program_the_tpu_compiler_refuses_for_memory_is_one_line(capsys):
    # On a TPU, a run whose step needs more than the chip's HBM: the compiler's RESOURCE_EXHAUSTED (as jax raises it
    # from the first call) ends the run in one line, status 3, as a compile-only run that does not fit does.
    from tpu_wan.core import entry

    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(170.51G) exceeds available HBM (15.75G).")

    def main(argv):
        raise RuntimeError(message)

    assert entry.run_main(main, []) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "expected at most 15.75 GiB (the TPU compiler's limit), found it needs 170.51 GiB" in err[0]

    def buggy(argv):  # any other runtime error is a bug: its traceback is kept
        raise RuntimeError("INTERNAL: something else")

    with pytest.raises(RuntimeError, match="INTERNAL"):
        entry.run_main(buggy, [])


# Image to video: the refusals run in this process (seconds each); the first one also as a separate process.


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """(a good PNG, a .png that is not an image, a GIF) for the image-to-video refusals; the tiny models they name
    are built first (a first use builds one, with progress bars on stderr)."""
    import PIL.Image

    from tpu_wan.models import tiny

    for model_id in tiny.TINY_MODELS:
        tiny.ensure_tiny_checkpoint(model_id=model_id)

    folder = tmp_path_factory.mktemp("images")
    good, broken, gif = folder / "cat.png", folder / "broken.png", folder / "cat.gif"
    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(good)
    broken.write_bytes(b"not a PNG at all")
    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(gif)
    return good, broken, gif


def _refused_in_process(script, *args, folder, expect, capsys):
    from scripts import run_in_process

    before = _snapshot(folder)
    status = run_in_process(script, [str(a) for a in args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "Traceback" not in lines[0], lines
    for fragment in expect:
        assert fragment in lines[0], lines[0]
    assert _snapshot(folder) == before


def test_stage1_missing_image_as_a_process(tmp_path):
    _refused(STAGE1, "--model_id", "tiny-random-i2v", "--image", tmp_path / "missing.png", "--output_dir",
             tmp_path / "out", "--cpu_devices", "1", folder=tmp_path,
             expect=[f"--image {tmp_path / 'missing.png'}: expected an image file, found no such file"])


I2V_REFUSALS = {
    "unreadable": (lambda imgs: ("--model_id", "tiny-random-i2v", "--image", imgs[1]),
                   ["broken.png: expected a readable image, found UnidentifiedImageError"]),
    "not-an-image-format": (lambda imgs: ("--model_id", "tiny-random-i2v", "--image", imgs[2]),
                            ["cat.gif: expected a PNG, JPEG or WebP file (.png, .jpg, .jpeg, .webp), found .gif"]),
    "image-for-text-model": (lambda imgs: ("--model_id", "tiny-random", "--image", imgs[0]),
                             ["--image: expected an image-to-video model", "found tiny-random, a text-to-video model"]),
    "image-for-text-a14b": (lambda imgs: ("--model_id", "tiny-random-a14b", "--image", imgs[0]),
                            ["found tiny-random-a14b, a text-to-video model"]),
    "no-image-for-i2v": (lambda imgs: ("--model_id", "tiny-random-i2v"),
                         ["--image: expected an image for tiny-random-i2v (an image-to-video model), found none"]),
    "no-image-for-i2v-a14b": (lambda imgs: ("--model_id", "tiny-random-i2v-a14b"),
                              ["--image: expected an image for tiny-random-i2v-a14b"]),
    "last-image-with-clip": (lambda imgs: ("--model_id", "tiny-random-i2v", "--image", imgs[0], "--last_image",
                                           imgs[0]),
                             ["--last_image: expected a model that takes a last frame (Wan 2.2 I2V-A14B)",
                              "first-last-frame transformer (FLF2V)"]),
    "last-image-ti2v": (lambda imgs: ("--model_id", "tiny-random-ti2v", "--image", imgs[0], "--last_image", imgs[0]),
                        ["--last_image: expected a model that takes a last frame", "TI2V conditions on the first "
                         "frame only"]),
    "ti2v-size-off-stride": (lambda imgs: ("--model_id", "tiny-random-ti2v", "--image", imgs[0], "--width", "48"),
                             ["--width must be a multiple of 32 for tiny-random-ti2v, found 48"]),
    "size-without-image": (lambda imgs: ("--model_id", "tiny-random", "--height", "32"),
                           ["--height on stage 1: expected --image with it"]),
}


@pytest.mark.parametrize("case", I2V_REFUSALS)
def test_stage1_image_refusals(image_files, tmp_path, capsys, case):
    args, expect = I2V_REFUSALS[case]
    _refused_in_process(STAGE1, *args(image_files), "--output_dir", tmp_path / "out", folder=tmp_path,
                        expect=expect, capsys=capsys)


def test_image_list_count_must_match_the_prompts(image_files, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    (tmp_path / "images.txt").write_text(f"{image_files[0]}\n")
    _refused_in_process(STAGE1, "--model_id", "tiny-random-i2v", "--prompt_file", tmp_path / "prompts.txt",
                        "--image_file", tmp_path / "images.txt", "--output_dir", tmp_path / "out", folder=tmp_path,
                        expect=["images.txt: expected one image per prompt (2), found 1"], capsys=capsys)


def test_generate_image_for_a_text_model(image_files, tmp_path, capsys):
    _refused_in_process(GENERATE, "--model_id", "tiny-random", "--image", image_files[0], *SIZE, "--output_video",
                        tmp_path / "v.mp4", folder=tmp_path, expect=["--image: expected an image-to-video model"],
                        capsys=capsys)


@pytest.fixture(scope="module")
def i2v_stage1_dir(tmp_path_factory, image_files):
    out = tmp_path_factory.mktemp("i2v_stage1")
    pipeline.run_stage1("tiny-random-i2v", ["a cat"], DEFAULT_NEGATIVE_PROMPT, out, dp=2, tp=4,
                        images=[str(image_files[0])], size=(32, 48, 5))
    return out


@pytest.mark.parametrize("flag, value, encoded", [("--height", "64", "32"), ("--frames", "9", "5")])
def test_stage2_size_other_than_the_image_encoding(i2v_stage1_dir, capsys, flag, value, encoded):
    _refused_in_process(STAGE2, "--input_dir", i2v_stage1_dir, flag, value, "--num_inference_steps", "2",
                        *MESH_2x4[2:], folder=i2v_stage1_dir,
                        expect=[f"{flag}: expected the size stage 1 encoded the image at (48x32x5), found {value}",
                                f"(rerun stage 1 with {flag} {value})"], capsys=capsys)


def test_stage2_image_tensors_missing(i2v_stage1_dir, tmp_path, capsys):
    _copy_stage1(i2v_stage1_dir, tmp_path)
    prompt, negative = artifacts.load_embeddings(tmp_path)
    artifacts.save_embeddings(tmp_path, prompt, negative, metadata={"model_id": "tiny-random-i2v"})
    _refused_in_process(STAGE2, "--input_dir", tmp_path, "--num_inference_steps", "2", *MESH_2x4[2:],
                        folder=tmp_path, expect=["expected image tensors ['image_condition', 'image_embeds'] for "
                                                 "tiny-random-i2v (an image in generation_config.json), found []"],
                        capsys=capsys)
