"""bfloat16, what a TPU runs by default (UMT5 and the DiT in bf16, the VAE in float32), against diffusers'
WanPipeline loaded the same way (`dtype=torch.bfloat16`, its VAE in float32) on the same weights, prompt and
starting noise. Neither can equal the float32 reference; ours must be no further from it than diffusers' is."""

import copy

import jax
import numpy as np
import pytest
import torch
from conftest import (
    BF16_MIN_SHARE,
    BF16_OVER_DIFFUSERS,
    FRAMES,
    HEIGHT,
    NEGATIVE,
    PROMPTS,
    SEED,
    STEPS,
    WIDTH,
    diffusers_run,
    rel_err,
)

from tpu_wan.core.config import GenerationConfig
from tpu_wan.models.transformer import Denoiser
from tpu_wan.run import oneshot, pipeline
from tpu_wan.runtime.mesh import make_mesh

PROMPT, GUIDANCE = PROMPTS[0], 5.0


def _outputs(embeds, negative, latents, frames):
    return {"embeddings": np.concatenate([np.asarray(embeds, np.float32), np.asarray(negative, np.float32)]),
            "latents": np.asarray(latents, np.float32), "frames": np.asarray(frames, np.float32)}


def _diffusers(pipe):
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(PROMPT, NEGATIVE, max_sequence_length=512)
    latents = diffusers_run(pipe, PROMPT, GUIDANCE, "latent")
    frames = diffusers_run(pipe, PROMPT, GUIDANCE, "np")
    return _outputs(embeds.float(), negative.float(), latents, frames)


@pytest.fixture(scope="module")
def references(tiny_path, diffusers_pipe):
    """(float32 reference, diffusers' bf16 outputs)."""
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(tiny_path, subfolder="vae", dtype=torch.float32)
    bf16 = WanPipeline.from_pretrained(tiny_path, vae=vae, dtype=torch.bfloat16)
    bf16.set_progress_bar_config(disable=True)
    assert bf16.transformer.dtype == bf16.text_encoder.dtype == torch.bfloat16 and bf16.vae.dtype == torch.float32
    return _diffusers(diffusers_pipe), _diffusers(bf16)


_generators = {}  # mesh -> our bf16 Generator, its text encoder and VAE shared by both attention choices


@pytest.fixture(scope="module", params=[(1, 1, "auto"), (1, 1, "custom"), (2, 4, "auto"), (2, 4, "custom")],
                ids=lambda p: f"mesh{p[0]}x{p[1]}-{p[2]}")
def ours(request, tiny_path):
    dp, tp, choice = request.param
    if (dp, tp) not in _generators:
        mesh = make_mesh(dp, tp, devices=jax.devices()[: dp * tp])
        _generators[(dp, tp)] = oneshot.Generator("tiny-random", mesh, text_dtype="bfloat16", dtype="bfloat16")
    models = _generators[(dp, tp)]
    if choice != "auto":  # auto is XLA attention on a CPU; custom is our Pallas kernel (interpreted)
        models = copy.copy(models)
        models.denoiser = Denoiser(tiny_path, models.denoiser.mesh, "bfloat16", choice)
    cfg = pipeline.resolve_stage2(
        GenerationConfig(model_id="tiny-random", prompts=(PROMPT,), negative_prompt=NEGATIVE, text_dtype="bfloat16"),
        pipeline.Stage2Settings(height=HEIGHT, width=WIDTH, frames=FRAMES, num_inference_steps=STEPS,
                              guidance_scale=GUIDANCE, seeds=(SEED,), dtype="bfloat16"),
        models.denoiser.mesh,
    )
    embeds, negative, latents, frames = models.run(cfg, progress=False)
    assert embeds.dtype == np.dtype("bfloat16")
    return _outputs(embeds, negative, latents, frames)


@pytest.mark.parametrize("what", ["embeddings", "latents", "frames"])
def test_bf16_no_further_from_float32_than_diffusers_bf16(ours, references, what):
    reference, theirs = references
    ours_err, theirs_err = rel_err(ours[what], reference[what]), rel_err(theirs[what], reference[what])
    print(f"{what}: ours bf16 vs f32 {ours_err:.3e}, diffusers bf16 vs f32 {theirs_err:.3e}, "
          f"ratio {ours_err / theirs_err:.2f}")
    assert ours_err <= BF16_OVER_DIFFUSERS * theirs_err
    assert ours_err >= BF16_MIN_SHARE * theirs_err  # it really ran in bf16
