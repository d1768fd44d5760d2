"""Model folders of kinds the toolkit does not implement (Wan 2.2's two experts and TI2V-5B, image-to-video, a VAE
or transformer that is not Wan 2.1 text-to-video's) are refused by every entry point before any work: one line
naming the file, what was expected and what was found, exit status 2, nothing written, no weight read, nothing
compiled."""

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import signal

import numpy as np
import pytest
from scripts import GENERATE, STAGE1, STAGE2, STAGE3, load, run

from tpu_wan.core import artifacts, entry
from tpu_wan.core.config import DEFAULT_NEGATIVE_PROMPT, GenerationConfig, Stage2Settings
from tpu_wan.models import checkpoints, tiny

SIZE = ("--height", "16", "--width", "16", "--frames", "5", "--num_inference_steps", "2")
# The Wan 2.2 TI2V-5B VAE (diffusers' scripts/convert_wan_to_diffusers.py) at tiny widths: 48 latent channels,
# residual up blocks, 2x2 pixel patches (12 = 3 x 2 x 2 channels in and out), so 16x spatial compression.
TI2V_VAE = dict(base_dim=8, decoder_base_dim=16, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                latents_mean=[0.0] * 48, latents_std=[1.0] * 48)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}, indent=2))


def _save_transformer(folder, **changes):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    WanTransformer3DModel(**{**tiny.TRANSFORMER_CONFIG, **changes}).save_pretrained(folder / "transformer")


def _save_ti2v_vae(folder):
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    AutoencoderKLWan(**TI2V_VAE).save_pretrained(folder / "vae")


def _two_experts(folder):  # Wan 2.2 A14B: a high-noise and a low-noise transformer, switched at boundary_ratio
    shutil.copytree(folder / "transformer", folder / "transformer_2")
    _edit_json(folder / "model_index.json", transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875)


def _ti2v(folder):  # Wan 2.2 TI2V-5B: per-token timesteps, the z48 VAE, a 48-channel transformer
    _save_ti2v_vae(folder)
    _save_transformer(folder, in_channels=48, out_channels=48)
    _edit_json(folder / "model_index.json", expand_timesteps=True)


def _ti2v_vae(folder):  # TI2V-5B's parts under a plain Wan 2.1 model_index.json: the VAE itself is refused
    _save_ti2v_vae(folder)
    _save_transformer(folder, in_channels=48, out_channels=48)


def _image_to_video(folder):  # Wan 2.1 I2V: CLIP image encoder, image latents + mask as 20 extra input channels
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     image_size=32, patch_size=8)).save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(folder / "image_processor")
    _save_transformer(folder, in_channels=36, image_dim=32, added_kv_proj_dim=64)
    _edit_json(folder / "model_index.json", _class_name="WanImageToVideoPipeline",
               image_encoder=["transformers", "CLIPVisionModel"],
               image_processor=["transformers", "CLIPImageProcessor"])


def _image_transformer(folder):  # a text-to-video folder whose transformer is I2V's
    _save_transformer(folder, in_channels=36, image_dim=32, added_kv_proj_dim=64)


def _wrong_channels(folder):  # a transformer that denoises 48 channels beside the 16-channel Wan 2.1 VAE
    _save_transformer(folder, in_channels=48, out_channels=48)


# kind -> (how tiny-random is turned into it, fragments of the one refusal line)
KINDS = {
    "wan22-two-experts": (_two_experts, [
        "model_index.json: expected a Wan 2.1 text-to-video folder", "found transformer_2 and boundary_ratio=0.875",
        "two-expert Wan 2.2 models are not implemented"]),
    "wan22-ti2v": (_ti2v, [
        "model_index.json: expected a Wan 2.1 text-to-video folder", "found expand_timesteps=true",
        "Wan 2.2 TI2V models are not implemented"]),
    "wan22-vae": (_ti2v_vae, [
        "vae/config.json: expected the Wan 2.1 VAE our decoder implements (z_dim=16, is_residual=false, "
        "patch_size=null, out_channels=3, scale_factor_spatial=8",
        "found z_dim=48, is_residual=true, patch_size=2, out_channels=12, scale_factor_spatial=16"]),
    "image-to-video": (_image_to_video, [
        "model_index.json: expected a Wan 2.1 text-to-video folder",
        "found _class_name 'WanImageToVideoPipeline', image_encoder and image_processor",
        "image-to-video models are not implemented"]),
    "image-transformer": (_image_transformer, [
        "transformer/config.json: expected a text-to-video transformer (image_dim=null",
        "found image_dim=32, added_kv_proj_dim=64, in_channels=36",
        "image-to-video transformers are not implemented"]),
    "transformer-channels": (_wrong_channels, [
        "transformer/config.json: expected a text-to-video transformer",
        "in_channels and out_channels = the VAE's z_dim 16", "found in_channels=48, out_channels=48"]),
}


@pytest.fixture(scope="module")
def kinds(tiny_path, tmp_path_factory):
    """kind -> its model folder: a copy of tiny-random turned into that kind (diffusers' and transformers' own
    classes write the configs, and weights that fit them)."""
    root = tmp_path_factory.mktemp("kinds")
    folders = {}
    for kind, (make, _) in KINDS.items():
        folders[kind] = root / kind
        shutil.copytree(tiny_path, folders[kind])
        make(folders[kind])
    return folders


def _stage1_folder(folder, model):
    """What stage 1 writes for `model` (zero embeddings of the tiny text width), made without running it."""
    cfg = GenerationConfig(model_id=str(model), prompts=("a cat",), negative_prompt=DEFAULT_NEGATIVE_PROMPT)
    embeds = np.zeros((1, cfg.max_sequence_length, tiny.TEXT_DIM), np.float32)
    artifacts.save_embeddings(folder, embeds, embeds, metadata={"model_id": str(model)})
    artifacts.save_config(folder, cfg.to_json_dict())
    return folder


def _stage2_folder(folder, model):
    """What stage 2 writes for `model` at SIZE (zero latents), made without running it."""
    settings = Stage2Settings(height=16, width=16, frames=5, num_inference_steps=2, guidance_scale=5.0, seeds=(42,),
                              flow_shift=3.0, sample_solver="unipc", dtype="float32", mesh=(2, 4), sharding="megatron")
    cfg = GenerationConfig(model_id=str(model), prompts=("a cat",), negative_prompt=DEFAULT_NEGATIVE_PROMPT,
                           stage2=settings)
    artifacts.save_config(folder, cfg.to_json_dict())
    artifacts.save_latents(folder / artifacts.LATENTS_FILE, np.zeros(settings.latent_shape(1), np.float32))
    return folder


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: nothing can compile for a TPU on this host")

# entry point -> (script, what is written into its folder `out` first (None: nothing), its arguments for the
# model folder `model`)
ENTRY_POINTS = {
    "stage1": (STAGE1, None, lambda model, out: ["--model_id", model, "--output_dir", out]),
    "stage2": (STAGE2, _stage1_folder, lambda model, out: ["--input_dir", out, *SIZE]),
    "stage2-compile-only": (STAGE2, None, lambda model, out: [
        "--topology", "v6e-8", "--compile_only", "--num_prompts", "1", "--model_id", model, "--output_dir", out,
        *SIZE]),
    "stage3": (STAGE3, _stage2_folder, lambda model, out: ["--input_dir", out]),
    "generate": (GENERATE, None, lambda model, out: ["--model_id", model, "--output_video", out / "v.mp4", *SIZE]),
    "generate-compile-only": (GENERATE, None, lambda model, out: [
        "--model_id", model, "--topology", "v6e-8", "--compile_only", "--output_dir", out, *SIZE]),
}
COMPILE_ONLY = ("stage2-compile-only", "generate-compile-only")


def _snapshot(folder):
    """Every path under `folder` (hidden temp files included) with its content hash."""
    return {str(p.relative_to(folder)): p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def _no_work(monkeypatch):
    """Reading any weight or tokenizer, compiling a program for a slice, or writing a video fails the test."""
    from tpu_wan.core import video
    from tpu_wan.models import vae
    from tpu_wan.run import aot
    from tpu_wan.runtime import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the run started working on a model kind it does not implement")

    for module, name in ((loading, "load_sharded"), (vae, "load_params"), (checkpoints, "load_tokenizer"),
                         (aot, "compile_program"), (video, "write_video")):
        monkeypatch.setattr(module, name, refuse)


@functools.cache
def _script(path):
    return load(path)


def _run_in_process(script, argv) -> int:
    """The script's main as its command line runs it (tpu_wan.core.entry), in this process; the process settings a
    script makes (jax's compilation cache, environment variables, the SIGTERM handler) are put back after."""
    import jax

    jax_settings = {name: getattr(jax.config, name) for name in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs", "jax_enable_compilation_cache")}
    environment, sigterm = dict(os.environ), signal.getsignal(signal.SIGTERM)
    try:
        return entry.run_main(_script(script).main, argv)
    finally:
        for name, value in jax_settings.items():
            jax.config.update(name, value)
        os.environ.clear()
        os.environ.update(environment)
        signal.signal(signal.SIGTERM, sigterm)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry_point", [pytest.param(e, marks=needs_libtpu) if e in COMPILE_ONLY else e
                                         for e in ENTRY_POINTS])
def test_every_entry_point_refuses_before_any_work(kinds, kind, entry_point, tmp_path, monkeypatch, capsys):
    script, prepare, arguments = ENTRY_POINTS[entry_point]
    model, out = kinds[kind], tmp_path / "out"
    out.mkdir()
    if prepare:
        prepare(out, model)
    before, model_before = _snapshot(out), _snapshot(model)
    _no_work(monkeypatch)
    status = _run_in_process(script, [str(a) for a in arguments(model, out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2, lines
    assert len(lines) == 1, lines
    assert str(model) in lines[0], lines[0]
    for fragment in KINDS[kind][1]:
        assert fragment in lines[0], lines[0]
    assert _snapshot(out) == before
    assert _snapshot(model) == model_before


def test_the_command_line_contract(kinds, tmp_path):
    # As a user runs it: a separate process, one line on stderr, status 2, no traceback, nothing written.
    proc = run(STAGE1, "--model_id", kinds["wan22-two-experts"], "--output_dir", tmp_path / "out", "--cpu_devices",
               "1", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{kinds['wan22-two-experts']}/model_index.json: expected a Wan 2.1 text-to-video folder" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_hub_model_of_another_kind_is_refused_before_its_weights_download(kinds, monkeypatch):
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append(allow_patterns)
        return str(kinds["wan22-two-experts"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(checkpoints.CheckpointError, match="two-expert Wan 2.2 models are not implemented"):
        checkpoints.resolve_model("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    assert asked == [["*.json"]]  # the config files only: no *.safetensors was asked for



@pytest.mark.parametrize("model_id, found", [
    ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "found transformer_2 and boundary_ratio=0.875 (two-expert Wan 2.2 models"),
    ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "found expand_timesteps=true (Wan 2.2 TI2V models"),
])
def test_the_published_wan22_ids_are_refused_for_their_kind_not_as_unknown(model_id, found):
    # Their configs ship (no download): every entry point decides settings from checkpoints.config_folder first.
    with pytest.raises(checkpoints.CheckpointError, match=r"expected a Wan 2\.1 text-to-video folder .*"
                       + found.replace("(", r"\(").replace(".", r"\.")):
        checkpoints.config_folder(model_id)


def test_the_packaged_wan22_transformers_are_the_published_models():
    """The packaged configs build diffusers' transformer at the published sizes: each A14B expert is Wan 2.1 14B's
    architecture (the same 14.29 B parameters) and TI2V-5B has 5.00 B."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    def parameters(name, component="transformer"):
        config = json.loads((checkpoints.PACKAGED_CONFIGS / name / component / "config.json").read_text())
        with init_empty_weights():
            return sum(p.numel() for p in WanTransformer3DModel.from_config(config).parameters())

    wan21_14b = parameters("Wan2.1-T2V-14B-Diffusers")
    assert round(wan21_14b / 1e9, 2) == 14.29
    experts = [parameters("Wan2.2-T2V-A14B-Diffusers", c) for c in ("transformer", "transformer_2")]
    assert experts == [wan21_14b, wan21_14b]
    assert round(parameters("Wan2.2-TI2V-5B-Diffusers") / 1e9, 2) == 5.00
