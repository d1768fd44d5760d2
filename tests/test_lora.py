"""LoRAs against diffusers' load_lora_weights + fuse_lora on the same tiny folder: one file per format people share
(diffusers/PEFT keys with a LoRA config in the metadata; original Wan keys as lightx2v/ComfyUI write them, lora_down/up
with alpha and diff_b; the same with lora_A/B as Kijai writes them; kohya/musubi lora_unet_*), each written here by
hand, fused into our weights at load; the same latents on 1x1 and 2x4; one LoRA per expert of a two-expert model."""

import json

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import FRAMES, HEIGHT, LATENT_RTOL, NEGATIVE, SEED, WIDTH, diffusers_scheduler, rel_err

from tpu_wan.core.config import AttentionOptions, ConfigError, GenerationConfig, LoraFile, Stage2Settings
from tpu_wan.core.errors import LoraError
from tpu_wan.models import tiny
from tpu_wan.run import pipeline
from tpu_wan.runtime.mesh import make_mesh

PROMPT = "A cat playing piano in a jazz club"
STEPS, GUIDANCE, SHIFT = 3, 5.0, 3.0
RANK = 4
# The tiny model's Linear layers an original-format LoRA adapts in each block, as Wan names them -> diffusers' names.
WAN_LINEARS = {**{f"self_attn.{o}": f"attn1.{c}" for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
               **{f"cross_attn.{o}": f"attn2.{c}" for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
               "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
# A LoRA must move the latents far beyond LATENT_RTOL, or a LoRA that fused nothing would pass: moves them
# relative (measured 2.3e-2 to 9.0e-2) for these factors (std 0.15, rank 4) on the tiny model.
LORA_MIN_EFFECT = 1e-2


def _shapes(model_id=tiny.TINY_MODEL_ID):
    from diffusers import WanTransformer3DModel

    path = tiny.ensure_tiny_checkpoint(model_id=model_id)
    model = WanTransformer3DModel.from_pretrained(path, subfolder="transformer")
    return {name: tuple(p.shape) for name, p in model.named_parameters()}, model.config.num_layers


def _factors(rng, out_dim, in_dim, rank=RANK):
    """(down [r, in], up [out, r]) float32, large enough to change the video."""
    return (torch.from_numpy(rng.normal(0, 0.15, (rank, in_dim)).astype(np.float32)),
            torch.from_numpy(rng.normal(0, 0.15, (out_dim, rank)).astype(np.float32)))


def write_diffusers(path, seed):
    """diffusers/PEFT keys for attn1 and the FFN, with a LoRA config: alpha 8 over r 4 (scale 2), and the FFN's
    output at rank 2 with alpha 1 (rank_pattern / alpha_pattern)."""
    shapes, layers = _shapes()
    rng, tensors = np.random.default_rng(seed), {}
    for i in range(layers):
        for m in ("attn1.to_q", "attn1.to_v", "ffn.net.0.proj", "ffn.net.2"):
            out_dim, in_dim = shapes[f"blocks.{i}.{m}.weight"]
            down, up = _factors(rng, out_dim, in_dim, 2 if m == "ffn.net.2" else RANK)
            tensors[f"transformer.blocks.{i}.{m}.lora_A.weight"] = down
            tensors[f"transformer.blocks.{i}.{m}.lora_B.weight"] = up
    config = {"r": RANK, "lora_alpha": 8, "rank_pattern": {"ffn.net.2": 2}, "alpha_pattern": {"ffn.net.2": 1},
              "target_modules": sorted({k[len("transformer."):].split(".lora_")[0] for k in tensors}),
              "lora_bias": False, "use_dora": False}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    safetensors.torch.save_file(tensors, path, metadata=metadata)


def write_wan(path, seed, down="lora_down", up="lora_up", alpha=True):
    """Original Wan keys (diffusion_model.blocks.N.self_attn.q...), every Linear of every block, with alpha (8 over
    rank 4), diff_b biases on the self-attention, a norm diff and a full-weight diff (both dropped by diffusers)."""
    shapes, layers = _shapes()
    rng, tensors = np.random.default_rng(seed), {}
    for i in range(layers):
        for ours, theirs in WAN_LINEARS.items():
            out_dim, in_dim = shapes[f"blocks.{i}.{theirs}.weight"]
            d, u = _factors(rng, out_dim, in_dim)
            tensors[f"diffusion_model.blocks.{i}.{ours}.{down}.weight"] = d
            tensors[f"diffusion_model.blocks.{i}.{ours}.{up}.weight"] = u
            if alpha:
                tensors[f"diffusion_model.blocks.{i}.{ours}.alpha"] = torch.tensor(8.0)
            if ours.startswith("self_attn"):
                tensors[f"diffusion_model.blocks.{i}.{ours}.diff_b"] = torch.from_numpy(
                    rng.normal(0, 0.1, out_dim).astype(np.float32))
        tensors[f"diffusion_model.blocks.{i}.norm3.diff"] = torch.zeros(8)
    safetensors.torch.save_file(tensors, path)


def write_musubi(path, seed):
    """kohya/musubi keys (lora_unet_blocks_N_self_attn_q.lora_down.weight) with alpha 2 over rank 4."""
    shapes, layers = _shapes()
    rng, tensors = np.random.default_rng(seed), {}
    for i in range(layers):
        for ours, theirs in WAN_LINEARS.items():
            out_dim, in_dim = shapes[f"blocks.{i}.{theirs}.weight"]
            d, u = _factors(rng, out_dim, in_dim)
            name = f"lora_unet_blocks_{i}_{ours.replace('.', '_')}"
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = d, u
            tensors[f"{name}.alpha"] = torch.tensor(2.0)
    safetensors.torch.save_file(tensors, path)


FORMATS = {
    "diffusers": write_diffusers,
    "wan_lora_down_up": write_wan,
    "wan_lora_A_B": lambda path, seed: write_wan(path, seed, "lora_A", "lora_B", alpha=False),
    "musubi": write_musubi,
}


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    files = {}
    for i, (name, write) in enumerate(FORMATS.items()):
        files[name] = folder / f"{name}.safetensors"
        write(files[name], seed=i)
    return files


def _reference(model_id, loras, loras_2=()):
    """diffusers' latents with `loras` ((path, scale), ...) loaded and fused into transformer (`loras_2`: into
    transformer_2), and the prompt embeddings it used."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny.ensure_tiny_checkpoint(model_id=model_id), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (path, scale) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
        names.append((f"a{i}", scale))
    for i, (path, scale) in enumerate(loras_2):
        pipe.load_lora_weights(str(path), adapter_name=f"b{i}", load_into_transformer_2=True)
        names.append((f"b{i}", scale))
    if names:
        pipe.set_adapters([n for n, _ in names], [s for _, s in names])
        pipe.fuse_lora(components=["transformer", "transformer_2"] if loras_2 else ["transformer"])
    pipe.scheduler = diffusers_scheduler("unipc", SHIFT)
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(PROMPT, NEGATIVE, max_sequence_length=512)
        latents = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=HEIGHT, width=WIDTH,
                       num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(SEED)).frames
    return latents.float().numpy(), embeds.numpy(), negative.numpy()


def _ours(model_id, mesh, loras=None, loras_2=None, embeds=None):
    mesh = make_mesh(*mesh, devices=jax.devices()[: mesh[0] * mesh[1]])
    settings = Stage2Settings(height=HEIGHT, width=WIDTH, frames=FRAMES, num_inference_steps=STEPS,
                              guidance_scale=GUIDANCE, flow_shift=SHIFT, seeds=(SEED,), dtype="float32",
                              guidance_scale_2=GUIDANCE if model_id == tiny.TINY_A14B_ID else None,
                              loras=loras, loras_2=loras_2)
    cfg = pipeline.resolve_stage2(GenerationConfig(model_id=model_id, prompts=(PROMPT,), negative_prompt=NEGATIVE),
                                  settings, mesh)
    denoiser = pipeline.load_denoiser(tiny.ensure_tiny_checkpoint(model_id=model_id), mesh, "float32",
                                      AttentionOptions(), **pipeline.finetune_settings(cfg, non_strict=False))
    return pipeline.denoise(denoiser, cfg, *embeds, progress=False), cfg


@pytest.fixture(scope="module")
def plain():
    """diffusers without a LoRA: (latents, embeds, negative embeds)."""
    return _reference(tiny.TINY_MODEL_ID, [])


@pytest.mark.parametrize("mesh", [(1, 1), (2, 4)], ids=lambda m: f"mesh{m[0]}x{m[1]}")
@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_latents_match_diffusers(lora_files, plain, fmt, mesh):
    scale = 0.7
    ref, embeds, negative = _reference(tiny.TINY_MODEL_ID, [(lora_files[fmt], scale)])
    ours, cfg = _ours(tiny.TINY_MODEL_ID, mesh, loras=(LoraFile(str(lora_files[fmt]), scale),),
                      embeds=(embeds, negative))
    err, effect = rel_err(ours, ref), rel_err(plain[0], ref)
    print(f"{fmt} {mesh}: latents rel err {err:.2e} (the LoRA moves them {effect:.2e})")
    assert effect > LORA_MIN_EFFECT
    assert err <= LATENT_RTOL
    (recorded,) = cfg.to_json_dict()["loras"]
    assert recorded["file"] == f"{fmt}.safetensors" and recorded["scale"] == scale and len(recorded["sha256"]) == 64


def test_two_loras_in_order_with_their_scales(lora_files, plain):
    loras = [(lora_files["wan_lora_down_up"], 0.5), (lora_files["diffusers"], 1.5)]
    ref, embeds, negative = _reference(tiny.TINY_MODEL_ID, loras)
    ours, _ = _ours(tiny.TINY_MODEL_ID, (2, 4), loras=tuple(LoraFile(str(p), s) for p, s in loras),
                    embeds=(embeds, negative))
    print(f"two LoRAs: latents rel err {rel_err(ours, ref):.2e}")
    assert rel_err(ours, ref) <= LATENT_RTOL


@pytest.mark.parametrize("mesh", [(1, 1), (2, 4)], ids=lambda m: f"mesh{m[0]}x{m[1]}")
def test_a_lora_per_expert(lora_files, mesh):
    # tiny-random-a14b's experts share the tiny transformer's shapes, so the same files fit both
    high, low = (lora_files["wan_lora_down_up"], 1.0), (lora_files["musubi"], 0.8)
    ref, embeds, negative = _reference(tiny.TINY_A14B_ID, [high], [low])
    only_high, _, _ = _reference(tiny.TINY_A14B_ID, [high])
    ours, cfg = _ours(tiny.TINY_A14B_ID, mesh, loras=(LoraFile(str(high[0]), high[1]),),
                      loras_2=(LoraFile(str(low[0]), low[1]),), embeds=(embeds, negative))
    err = rel_err(ours, ref)
    print(f"a14b {mesh}: latents rel err {err:.2e} (the low-noise expert's LoRA moves them "
          f"{rel_err(only_high, ref):.2e})")
    assert set(cfg.stage2.expert_steps) == {"transformer", "transformer_2"}  # both experts ran
    assert rel_err(only_high, ref) > LORA_MIN_EFFECT
    assert err <= LATENT_RTOL


def _one_key_lora(path, key, shape):
    safetensors.torch.save_file({key: torch.zeros(shape)}, path)


def test_refusals(tmp_path, lora_files):
    shapes, _ = _shapes()
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    model = tiny.ensure_tiny_checkpoint()
    from tpu_wan.models import lora

    # a key that adapts no weight of the model (a third block of the two-block tiny model)
    stray = tmp_path / "stray.safetensors"
    rank_a, rank_b = (RANK, shapes["blocks.0.attn1.to_q.weight"][1]), (shapes["blocks.0.attn1.to_q.weight"][0], RANK)
    safetensors.torch.save_file({"transformer.blocks.7.attn1.to_q.lora_A.weight": torch.zeros(rank_a),
                                 "transformer.blocks.7.attn1.to_q.lora_B.weight": torch.zeros(rank_b)}, stray)
    with pytest.raises(LoraError, match=r"--lora .*stray.safetensors: blocks.7.attn1.to_q: expected a Linear layer"):
        pipeline.load_denoiser(model, mesh, "float32", AttentionOptions(),
                               loras={"transformer": (LoraFile(str(stray)),)})
    # factors that do not multiply to the weight's shape
    wrong = tmp_path / "wrong.safetensors"
    safetensors.torch.save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(RANK, 3),
                                 "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(rank_b)}, wrong)
    with pytest.raises(LoraError, match=r"expected B @ A of shape"):
        lora.fusions((LoraFile(str(wrong)),), {f"{k}": (v, None) for k, v in shapes.items()})
    # keys without 'lora' (diffusers' own check), a missing file, not safetensors
    _one_key_lora(tmp_path / "plain.safetensors", "transformer.blocks.0.attn1.to_q.weight", (2, 2))
    with pytest.raises(LoraError, match=r"expected LoRA keys .*found transformer.blocks.0.attn1.to_q.weight"):
        lora.read(LoraFile(str(tmp_path / "plain.safetensors")))
    with pytest.raises(LoraError, match=r"--lora: expected a file, found nothing at"):
        lora.checked((LoraFile(str(tmp_path / "none.safetensors")),))
    with pytest.raises(LoraError, match=r"expected a .safetensors file, found .pt"):
        lora.checked((LoraFile(str(tmp_path / "x.pt")),))
    # --lora_2 on a one-transformer model
    cfg = GenerationConfig(model_id="tiny-random", prompts=(PROMPT,), negative_prompt=NEGATIVE)
    with pytest.raises(ConfigError, match=r"--lora_2: expected a two-expert model"):
        pipeline.resolve_stage2(cfg, Stage2Settings(loras_2=(LoraFile(str(lora_files["musubi"])),)), mesh)


def test_lora_flag_parsing():
    assert LoraFile.parse("a/b.safetensors") == LoraFile("a/b.safetensors", 1.0)
    assert LoraFile.parse("a/b.safetensors:0.25") == LoraFile("a/b.safetensors", 0.25)
    assert LoraFile.parse("C:/x/b.safetensors") == LoraFile("C:/x/b.safetensors", 1.0)  # a ':' that is no scale
    assert LoraFile.parse("b.safetensors:-1") == LoraFile("b.safetensors", -1.0)


def test_recorded_and_resumed_only_with_the_same_lora(tmp_path, lora_files):
    from tpu_wan.core import artifacts

    pipeline.run_stage1("tiny-random", [PROMPT], NEGATIVE, tmp_path, dp=2, tp=4)
    settings = Stage2Settings(height=32, width=32, frames=5, num_inference_steps=2, seeds=(SEED,), dtype="float32",
                              loras=(LoraFile(str(lora_files["musubi"]), 0.5),))
    pipeline.run_stage2(tmp_path, settings, dp=2, tp=4)
    recorded = artifacts.load_config(tmp_path)["loras"]
    assert [(r["file"], r["scale"]) for r in recorded] == [("musubi.safetensors", 0.5)]
    assert pipeline.run_stage2(tmp_path, settings, dp=2, tp=4).metrics is None  # the same LoRA: nothing left to do
    other = Stage2Settings(**{**settings.__dict__, "loras": (LoraFile(str(lora_files["musubi"]), 0.6),)})
    with pytest.raises(ConfigError, match=r"other settings \(loras: .*'scale': 0.5.* -> .*'scale': 0.6"):
        pipeline.run_stage2(tmp_path, other, dp=2, tp=4)


def test_generate_flax_with_a_lora_the_distilled_sampler_and_a_cache(tmp_path, lora_files):
    # the command line end to end (in this process): the flags as a user types them, recorded in the config
    from scripts import GENERATE, run_in_process

    from tpu_wan.core import artifacts

    size = ("--height", "32", "--width", "32", "--frames", "5", "--warmup_steps", "0")  # the tests' 8 devices
    lora = f"{lora_files['wan_lora_down_up']}:0.5"
    assert run_in_process(GENERATE, ["--model_id", "tiny-random", *size, "--lora", lora, "--sample_solver", "distill",
                                     "--denoising_steps", "1000", "500", "--save_intermediates", tmp_path / "d",
                                     "--output_video", tmp_path / "d.mp4"]) == 0
    cfg = artifacts.load_config(tmp_path / "d")
    assert (cfg["sample_solver"], cfg["denoising_steps"], cfg["num_inference_steps"], cfg["guidance_scale"],
            cfg["flow_shift"]) == ("distill", [1000, 500], 2, 1.0, 5.0)
    assert [(r["file"], r["scale"]) for r in cfg["loras"]] == [("wan_lora_down_up.safetensors", 0.5)]
    assert run_in_process(GENERATE, ["--model_id", "tiny-random", *size, "--num_inference_steps", "4", "--cache",
                                     "first_block:0.05", "--output_video", tmp_path / "c.mp4",
                                     "--metrics", tmp_path / "c.json"]) == 0
    metrics = artifacts.load_metrics(tmp_path / "c.json")
    assert metrics["config"]["cache"] == "first_block:0.05"
    assert set(metrics["stages"]["transformer"]["block_stacks_run"]) == {"cond", "uncond"}
