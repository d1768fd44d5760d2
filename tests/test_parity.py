"""Our three stages against diffusers' WanPipeline on the same tiny weights: embeddings, latents, frames."""

import copy

import jax
import numpy as np
import pytest
import torch
from conftest import (
    EMBED_RTOL,
    FRAMES,
    FRAMES_ATOL,
    HEIGHT,
    LATENT_RTOL,
    NEGATIVE,
    PROMPTS,
    SEED,
    STEPS,
    WIDTH,
    diffusers_run,
    rel_err,
)

from tpu_wan.core.config import GenerationConfig, latent_shape
from tpu_wan.run import oneshot, pipeline, sweep
from tpu_wan.runtime.mesh import make_mesh

MESHES = [(1, 1), (2, 4)]
GUIDANCES = [1.0, 5.0]


@pytest.fixture(scope="module", params=MESHES, ids=lambda m: f"mesh{m[0]}x{m[1]}")
def models(request, tiny_path):
    dp, tp = request.param
    mesh = make_mesh(dp, tp, devices=jax.devices()[: dp * tp])
    return oneshot.Generator("tiny-random", mesh, text_dtype="float32", dtype="float32")


def _config(prompt, guidance, prompts=None, **sampling):
    cfg = GenerationConfig(model_id="tiny-random", prompts=tuple(prompts or (prompt,)), negative_prompt=NEGATIVE)
    sampling = pipeline.Stage2Settings(
        height=HEIGHT, width=WIDTH, frames=FRAMES, num_inference_steps=STEPS, guidance_scale=guidance,
        **{"seeds": (SEED,), "dtype": "float32", **sampling},
    )
    return pipeline.resolve_stage2(cfg, sampling, make_mesh(1, 1, devices=jax.devices()[:1]))


@pytest.mark.parametrize("prompt", PROMPTS, ids=["en", "zh"])
def test_embeddings_match_diffusers(models, diffusers_pipe, prompt):
    ours, ours_neg = pipeline.encode(models.encoder, _config(prompt, 5.0))
    with torch.no_grad():
        ref, ref_neg = diffusers_pipe.encode_prompt(prompt, NEGATIVE, max_sequence_length=512)
    assert ours.shape == tuple(ref.shape) == (1, 512, 32)
    print(f"embeddings rel err {rel_err(ours, ref):.2e} (negative {rel_err(ours_neg, ref_neg):.2e})")
    assert rel_err(ours, ref) <= EMBED_RTOL
    assert rel_err(ours_neg, ref_neg) <= EMBED_RTOL
    # Past the true token count the rows are exact zeros, as diffusers pads them.
    np.testing.assert_array_equal(ours == 0, ref.numpy() == 0)


@pytest.mark.parametrize("guidance", GUIDANCES)
@pytest.mark.parametrize("prompt", PROMPTS, ids=["en", "zh"])
def test_latents_and_frames_match_diffusers(models, diffusers_pipe, prompt, guidance):
    cfg = _config(prompt, guidance)
    prompt_embeds, negative_embeds, latents, frames = models.run(cfg, progress=False)
    ref_latents = diffusers_run(diffusers_pipe, prompt, guidance, "latent")
    err = rel_err(latents, ref_latents)
    print(f"latents rel err {err:.2e}")
    assert err <= LATENT_RTOL, f"latents rel err {err:.3e}"
    # Frames from the same latents: diffusers decodes its own, we decode those same latents.
    ref_frames = diffusers_run(diffusers_pipe, prompt, guidance, "np")
    ours_frames = models.decoder.decode(ref_latents)
    assert ours_frames.shape == ref_frames.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    print(f"frames max abs err {np.abs(ours_frames - ref_frames).max():.2e}")
    np.testing.assert_allclose(ours_frames, ref_frames, rtol=0, atol=FRAMES_ATOL)


def test_guidance_changes_the_result(models):
    # Guards the parity tests' power: CFG must move the latents far beyond LATENT_RTOL, or a broken
    # unconditional branch could pass them. (The tiny model's text conditioning is weak: ~2e-3 here.)
    with_cfg = models.run(_config(PROMPTS[0], 5.0).replace(num_inference_steps=2), progress=False)[2]
    without = models.run(_config(PROMPTS[0], 1.0).replace(num_inference_steps=2), progress=False)[2]
    assert rel_err(with_cfg, without) > 100 * LATENT_RTOL


def test_our_embeddings_and_noise_drive_diffusers(models, diffusers_pipe):
    # Interoperability of the artifact layouts: what stage 1 writes and what stage 2 starts from, fed to
    # diffusers' WanPipeline, lands on our stage-2 latents.
    cfg = _config(PROMPTS[0], 5.0)
    prompt_embeds, negative_embeds, latents, _ = models.run(cfg, progress=False)
    noise = sweep.initial_noise(SEED, latent_shape(1, HEIGHT, WIDTH, FRAMES))
    ref = diffusers_run(
        diffusers_pipe, None, 5.0, "latent", prompt_embeds=torch.from_numpy(prompt_embeds),
        negative_prompt_embeds=torch.from_numpy(negative_embeds), latents=torch.from_numpy(noise),
    )
    assert rel_err(latents, ref) <= LATENT_RTOL


def test_custom_kernel_pipeline_equals_xla(models, tiny_path):
    # --attention custom: our Pallas kernel (interpreted on CPU) for every attention call of the DiT, self-
    # attention over video tokens and cross-attention over text, sharded as on a TPU mesh. The whole pipeline
    # against the default (XLA attention on CPU); UMT5 and the VAE do not route through tpu_wan.runtime.attention.
    from tpu_wan.models.transformer import Denoiser

    custom = copy.copy(models)  # the same text encoder and VAE (already compiled), a DiT with the kernel
    custom.denoiser = Denoiser(tiny_path, models.denoiser.mesh, "float32", "custom")
    cfg = _config(PROMPTS[0], 5.0)
    xla_embeds, _, xla_latents, xla_frames = models.run(cfg, progress=False)
    embeds, _, latents, frames = custom.run(cfg, progress=False)
    np.testing.assert_array_equal(embeds, xla_embeds)
    err = rel_err(latents, xla_latents)
    print(f"custom vs xla: latents rel err {err:.2e}, frames max abs {np.abs(frames - xla_frames).max():.2e}")
    assert err <= LATENT_RTOL
    np.testing.assert_allclose(frames, xla_frames, rtol=0, atol=FRAMES_ATOL)


@pytest.fixture(scope="module")
def embeddings(models):
    """The parity prompt's embeddings, encoded once per mesh for the denoising-only tests below."""
    return pipeline.encode(models.encoder, _config(PROMPTS[0], 5.0))


# The solvers other than the default, and the default at 720p's shift: the same transformer and noise, each
# solver's coefficients against diffusers' scheduler of that kind swapped into pipe.scheduler.
@pytest.mark.parametrize("solver, flow_shift", [("unipc", 5.0), ("dpm++", 3.0), ("dpm++", 5.0), ("euler", 3.0),
                                                ("euler", 5.0)])
def test_every_solver_and_shift_match_diffusers(models, diffusers_pipe, embeddings, solver, flow_shift):
    cfg = _config(PROMPTS[0], 5.0, sample_solver=solver, flow_shift=flow_shift)
    latents = pipeline.denoise(models.denoiser, cfg, *embeddings, progress=False)
    ref = diffusers_run(diffusers_pipe, PROMPTS[0], 5.0, "latent", flow_shift=flow_shift, solver=solver)
    err = rel_err(latents, ref)
    print(f"{solver} flow_shift {flow_shift}: latents rel err {err:.2e}")
    assert err <= LATENT_RTOL


def test_solvers_and_shifts_change_the_result(models, embeddings):
    # Guards the test above: each solver and each shift lands far from the others, so passing it is not luck.
    runs = {(solver, shift): pipeline.denoise(models.denoiser, _config(PROMPTS[0], 5.0, sample_solver=solver,
                                                                        flow_shift=shift), *embeddings, progress=False)
            for solver, shift in [("unipc", 3.0), ("unipc", 5.0), ("dpm++", 3.0), ("euler", 3.0)]}
    keys = list(runs)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert rel_err(runs[a], runs[b]) > 100 * LATENT_RTOL, (a, b)


def test_prompts_and_seeds_in_one_batch_match_diffusers_list_call(models, diffusers_pipe):
    # Two prompts x two seeds, all four videos in one batch, against one diffusers call with a list of prompts
    # and one generator per video (diffusers draws each row's noise from its own generator, as we do).
    seeds = (7, SEED)
    cfg = _config(None, 5.0, prompts=PROMPTS, seeds=seeds, batch_size=4)
    videos = pipeline.plan(cfg)
    prompt_embeds, negative_embeds = pipeline.encode(models.encoder, cfg)
    latents = pipeline.denoise(models.denoiser, cfg, prompt_embeds, negative_embeds, progress=False)
    ref = diffusers_run(diffusers_pipe, [PROMPTS[v.prompt_index] for v in videos], 5.0, "latent",
                        seeds=[v.seed for v in videos])
    assert latents.shape == ref.shape == (4, *latent_shape(1, HEIGHT, WIDTH, FRAMES)[1:])
    errs = [rel_err(a, b) for a, b in zip(latents, ref)]
    print("batch latents rel errs " + " ".join(f"{e:.2e}" for e in errs))
    assert max(errs) <= LATENT_RTOL


def test_init_latents_from_diffusers_prepare_latents_give_diffusers_video(models, diffusers_pipe, embeddings,
                                                                          tmp_path):
    # README: a `latents` file from diffusers can start stage 2. diffusers' own prepare_latents, seeded
    # otherwise than our --seed, saved with safetensors.torch; the video is diffusers' video from those latents.
    import safetensors.torch

    start = diffusers_pipe.prepare_latents(1, 16, HEIGHT, WIDTH, FRAMES, torch.float32, torch.device("cpu"),
                                           torch.Generator("cpu").manual_seed(1234))
    path = tmp_path / "start.safetensors"
    safetensors.torch.save_file({"latents": start}, path)
    cfg = _config(PROMPTS[0], 5.0, init_latents=str(path))
    latents = pipeline.denoise(models.denoiser, cfg, *embeddings, progress=False)
    ref = diffusers_run(diffusers_pipe, PROMPTS[0], 5.0, "latent", latents=start)
    err = rel_err(latents, ref)
    print(f"init_latents: latents rel err {err:.2e}")
    assert err <= LATENT_RTOL
    assert rel_err(start.numpy(), sweep.initial_noise(SEED, tuple(start.shape))) > 0.5  # not --seed's noise
    ref_frames = diffusers_run(diffusers_pipe, PROMPTS[0], 5.0, "np", latents=start)
    frames = models.decoder.decode(latents)
    print(f"init_latents: frames max abs err {np.abs(frames - ref_frames).max():.2e}")
    np.testing.assert_allclose(frames, ref_frames, rtol=0, atol=FRAMES_ATOL)
