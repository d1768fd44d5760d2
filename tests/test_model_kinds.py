"""Model folders of kinds the toolkit does not implement (video-to-video, first-last-frame, a VAE or transformer that
is neither Wan 2.1's nor Wan 2.2's) or whose parts do not fit together (two experts without a boundary, experts of
different architectures, an image transformer without its image encoder or pipeline) are refused by every entry
point before any work: one line naming the file, what was expected and what was found, exit status 2, nothing
written, no weight read, nothing compiled. The kinds it does implement are read from the same files
(tpu_wan.models.kinds)."""

import hashlib
import importlib.util
import json
import shutil

import numpy as np
import pytest
from scripts import GENERATE, STAGE1, STAGE2, STAGE3, run, run_in_process

from tpu_wan.core import artifacts
from tpu_wan.core.config import DEFAULT_NEGATIVE_PROMPT, GenerationConfig, Stage2Settings
from tpu_wan.models import checkpoints, tiny
from tpu_wan.models.kinds import ModelKind

SIZE = ("--height", "16", "--width", "16", "--frames", "5", "--num_inference_steps", "2")
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
    AutoencoderKLWan(**tiny.TI2V_VAE_CONFIG, latents_mean=[0.0] * 48, latents_std=[1.0] * 48).save_pretrained(
        folder / "vae")


def _experts_without_boundary(folder):  # Wan 2.2 A14B's transformer_2, but no boundary_ratio to switch at
    shutil.copytree(folder / "transformer", folder / "transformer_2")
    _edit_json(folder / "model_index.json", transformer_2=["diffusers", "WanTransformer3DModel"])


def _boundary_without_expert(folder):  # a boundary, but no low-noise expert to switch to
    _edit_json(folder / "model_index.json", boundary_ratio=0.875)


def _experts_differ(folder):  # two experts of different depths: no one compiled step serves both
    shutil.copytree(folder / "transformer", folder / "transformer_2")
    _edit_json(folder / "transformer_2" / "config.json", num_layers=3)
    _edit_json(folder / "model_index.json", transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875)


def _unpatched_z48_vae(folder):  # a 48-channel residual VAE without Wan 2.2's pixel patches: neither VAE
    _save_ti2v_vae(folder)
    _edit_json(folder / "vae" / "config.json", patch_size=None, scale_factor_spatial=8)
    _save_transformer(folder, in_channels=48, out_channels=48)


def _expanded_wide_patches(folder):  # per-token timesteps over 1x4x4 patches: WanPipeline builds them for 1x2x2
    _save_transformer(folder, patch_size=(1, 4, 4))
    _edit_json(folder / "model_index.json", expand_timesteps=True)


def _image_to_video(folder, **transformer):  # Wan 2.1 I2V: CLIP image encoder, image latents + mask as 20 more channels
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**tiny.CLIP_VISION_CONFIG)).save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(**tiny.CLIP_PROCESSOR_CONFIG).save_pretrained(folder / "image_processor")
    _save_transformer(folder, **{**tiny.I2V_TRANSFORMER_CONFIG, **tiny.I2V_CLIP_TRANSFORMER_CONFIG, **transformer})
    _edit_json(folder / "model_index.json", _class_name="WanImageToVideoPipeline",
               image_encoder=["transformers", "CLIPVisionModel"],
               image_processor=["transformers", "CLIPImageProcessor"])


def _first_last_frame(folder):  # Wan 2.1 FLF2V: the I2V layout with position embeddings for two images
    _image_to_video(folder, pos_embed_seq_len=2 * 17)


def _image_transformer_without_clip(folder):  # an I2V pipeline whose transformer wants CLIP, without an encoder
    _save_transformer(folder, **tiny.I2V_TRANSFORMER_CONFIG, **tiny.I2V_CLIP_TRANSFORMER_CONFIG)
    _edit_json(folder / "model_index.json", _class_name="WanImageToVideoPipeline")


def _image_transformer(folder):  # a text-to-video folder whose transformer is I2V's
    _save_transformer(folder, in_channels=36, image_dim=32, added_kv_proj_dim=64)


def _video_to_video(folder):  # diffusers' video-to-video pipeline over the same files
    _edit_json(folder / "model_index.json", _class_name="WanVideoToVideoPipeline")


def _wrong_channels(folder):  # a transformer that denoises 48 channels beside the 16-channel Wan 2.1 VAE
    _save_transformer(folder, in_channels=48, out_channels=48)


# kind -> (how tiny-random is turned into it, fragments of the one refusal line)
KINDS = {
    "experts-without-boundary": (_experts_without_boundary, [
        "model_index.json: expected boundary_ratio with transformer_2", "found none"]),
    "boundary-without-expert": (_boundary_without_expert, [
        "model_index.json: expected transformer_2 with boundary_ratio=0.875 (the low-noise expert), found none"]),
    "experts-differ": (_experts_differ, [
        "transformer_2/config.json: expected the config of transformer/config.json (both experts run one compiled "
        "step), found num_layers=2 vs 3"]),
    "z48-vae-unpatched": (_unpatched_z48_vae, [
        "vae/config.json: expected the Wan 2.2 VAE our decoder implements (patch_size=2, scale_factor_spatial=16",
        "found patch_size=null, scale_factor_spatial=8", "(the Wan 2.1 VAE is the other one implemented)"]),
    "expanded-wide-patches": (_expanded_wide_patches, [
        "transformer/config.json: expected patch_size [1,2,2] with expand_timesteps", "found [1,4,4]"]),
    "video-to-video": (_video_to_video, [
        "model_index.json: expected a Wan text- or image-to-video folder",
        "found _class_name 'WanVideoToVideoPipeline'", "(video-to-video models are not implemented)"]),
    "first-last-frame": (_first_last_frame, [
        "transformer/config.json: expected an image-to-video transformer (in_channels = 2 x the VAE's z_dim + 4 = 36",
        "found image_dim=32, added_kv_proj_dim=64, pos_embed_seq_len=34",
        "first-last-frame transformers (FLF2V) are not implemented"]),
    "image-transformer-without-clip": (_image_transformer_without_clip, [
        "transformer/config.json: expected an image-to-video transformer",
        "image_dim, added_kv_proj_dim and pos_embed_seq_len null: the folder has no image encoder",
        "found image_dim=32, added_kv_proj_dim=64, pos_embed_seq_len=null"]),
    "image-transformer": (_image_transformer, [
        "transformer/config.json: expected a text-to-video transformer (image_dim=null",
        "found image_dim=32, added_kv_proj_dim=64, in_channels=36",
        "an image-to-video transformer runs in a WanImageToVideoPipeline folder"]),
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
    status = run_in_process(script, [str(a) for a in arguments(model, out)])
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
    proc = run(STAGE1, "--model_id", kinds["video-to-video"], "--output_dir", tmp_path / "out", "--cpu_devices",
               "1", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{kinds['video-to-video']}/model_index.json: expected a Wan text- or image-to-video folder" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_hub_model_of_another_kind_is_refused_before_its_weights_download(kinds, monkeypatch):
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append(allow_patterns)
        return str(kinds["video-to-video"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(checkpoints.CheckpointError, match="video-to-video models are not implemented"):
        checkpoints.resolve_model("Wan-AI/Wan2.1-VACE-Diffusers")
    assert asked == [["*.json"]]  # the config files only: no *.safetensors was asked for



@pytest.mark.parametrize("model_id, kind", [
    ("Wan-AI/Wan2.1-T2V-14B-Diffusers", ModelKind()),
    ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", ModelKind(experts=("transformer", "transformer_2"), boundary_ratio=0.875)),
    ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", ModelKind(expand_timesteps=True, vae="wan2.2")),
    ("tiny-random-a14b", ModelKind(experts=("transformer", "transformer_2"), boundary_ratio=0.875)),
    ("tiny-random-ti2v", ModelKind(expand_timesteps=True, vae="wan2.2")),
    ("tiny-random-i2v", ModelKind(conditioning="concat", image_encoder=True)),
    ("tiny-random-i2v-a14b", ModelKind(experts=("transformer", "transformer_2"), boundary_ratio=0.9,
                                       conditioning="concat")),
])
def test_each_model_kind_is_read_from_its_config_files(model_id, kind):
    # Every entry point decides settings from checkpoints.config_folder first (packaged configs: no download).
    found = checkpoints.model_kind(checkpoints.config_folder(model_id))
    assert found == kind
    assert found.size_multiple == (32 if kind.vae == "wan2.2" else 16)


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
