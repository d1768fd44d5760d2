"""The step-distilled samplers (--sample_solver distill / distill_euler, lightx2v's Wan step-distill schedulers)
against a float64 transcription of their formulas written here, alone and driving diffusers' transformer; the
noise stream; their settings; and the no-CFG step (guidance 1, the distilled presets): one transformer call per
video, half the flops."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    DISTILL_RTOL,
    FRAMES,
    HEIGHT,
    LATENT_RTOL,
    NEGATIVE,
    PROMPTS,
    SEED,
    WIDTH,
    rel_err,
)

from tpu_wan.core.config import GenerationConfig, Stage2Settings
from tpu_wan.core.errors import ConfigError
from tpu_wan.models import tiny
from tpu_wan.run import pipeline, sweep
from tpu_wan.runtime.mesh import make_mesh
from tpu_wan.sampling import schedulers

LIGHTX2V_STEPS = (1000, 750, 500, 250)  # lightx2v's 4-step Wan models, at shift 5
SHAPE = (1, 16, 2, 4, 4)  # B, C, F, H, W
LATENTS = (1, 16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)  # the parity setting's latents


def transcription(solver, latents, velocity, steps, shift, draw):
    """lightx2v's WanStepDistillScheduler (distill) / Wan22StepDistillScheduler (distill_euler) in float64, from
    their formulas: sigma of t is the shifted s = linspace(1, 0, 1001)[1000 - t] = t / 1000; velocity(x, t) -> v at
    transformer timestep t = sigma x 1000; draw() -> the next N(0, 1) of the video's generator."""
    s = np.asarray(steps, np.float64) / 1000
    sigmas = shift * s / (1 + (shift - 1) * s)
    x = np.asarray(latents, np.float64)
    for i, sigma in enumerate(sigmas):
        v = np.asarray(velocity(x, sigma * 1000), np.float64)
        x0 = x - sigma * v
        if i == len(sigmas) - 1:
            x = x0
        elif solver == "distill":
            x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * np.asarray(draw(), np.float64)
        else:
            x = x0 + sigmas[i + 1] * v
    return x


def _mesh(dp, tp):
    return make_mesh(dp, tp, devices=jax.devices()[: dp * tp])


def _config(mesh, model_id="tiny-random", **settings):
    cfg = GenerationConfig(model_id=model_id, prompts=(PROMPTS[0],), negative_prompt=NEGATIVE)
    settings = {**dict(height=HEIGHT, width=WIDTH, frames=FRAMES, seeds=(SEED,), dtype="float32"), **settings}
    return pipeline.resolve_stage2(cfg, Stage2Settings(**settings), mesh)


# ---------------------------------------------------------------------------------------------------------------
# The schedule and the step alone.


@pytest.mark.parametrize("solver", ["distill", "distill_euler"])
def test_sigmas_by_hand(solver):
    # shift 5: 5 s / (1 + 4 s) at s = 1, 0.75, 0.5, 0.25
    sched = schedulers.make_schedule(solver, 4, 5.0, denoising_steps=LIGHTX2V_STEPS)
    hand = np.float32([1.0, 3.75 / 4, 2.5 / 3, 1.25 / 2, 0.0])
    np.testing.assert_array_equal(sched.sigmas, hand)
    assert [round(float(s), 4) for s in sched.sigmas] == [1.0, 0.9375, 0.8333, 0.625, 0.0]
    np.testing.assert_array_equal(sched.timesteps, np.float32([1000.0, 937.5, 2500 / 3, 625.0]))
    assert sched.denoising_steps == LIGHTX2V_STEPS and sched.takes_noise == (solver == "distill")
    assert [sched.renoises(i) for i in range(4)] == [solver == "distill"] * 3 + [False]


@pytest.mark.parametrize("steps, shift", [(LIGHTX2V_STEPS, 5.0), ((999, 600, 321, 40, 1), 3.0), ((1000,), 5.0)],
                         ids=["lightx2v", "five", "one"])
@pytest.mark.parametrize("solver", ["distill", "distill_euler"])
def test_step_equals_float64_transcription(solver, steps, shift):
    # A fixed fake velocity (0.5 x + a fixed field per timestep), so the sample feeds back into v as a model's does.
    sched = schedulers.make_schedule(solver, len(steps), shift, denoising_steps=steps)
    rng = np.random.default_rng(len(steps))
    latents = rng.standard_normal(SHAPE, dtype=np.float32)
    fields = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in steps]
    noises = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in steps]
    step = jax.jit(lambda *args: schedulers.step(*args))  # jit(schedulers.step)'s cache is test_schedulers' to count

    x, state, zeros = jnp.asarray(latents), schedulers.init_state(jnp.asarray(latents)), jnp.zeros(SHAPE)
    for i in range(len(steps)):
        v = 0.5 * x + fields[i]
        extra = (jnp.asarray(noises[i]) if sched.renoises(i) else zeros,) if sched.takes_noise else ()
        x, state = step(jnp.asarray(sched.coeffs[i]), state, v, x, *extra)
    field, draws = iter(fields), iter(noises)
    want = transcription(solver, latents, lambda x, t: 0.5 * x + next(field), steps, shift, lambda: next(draws))
    err = rel_err(x, want)
    print(f"{solver} {steps} shift {shift}: rel err {err:.2e}")
    assert err <= DISTILL_RTOL


def test_other_solvers_take_no_noise_input():
    # Their step programs are as before: no noise argument, no noise term.
    sample = jnp.zeros(SHAPE)
    row = jnp.asarray(schedulers.make_schedule("unipc", 3, 3.0).coeffs[1])
    plain = jax.make_jaxpr(schedulers.step)(row, schedulers.init_state(sample), sample, sample)
    noisy = jax.make_jaxpr(schedulers.step)(row, schedulers.init_state(sample), sample, sample, sample)
    assert len(plain.jaxpr.invars) == 6 and len(noisy.jaxpr.invars) == 7
    for solver in schedulers.DIFFUSERS_SOLVERS:
        assert not schedulers.make_schedule(solver, 5, 3.0).coeffs[:, schedulers.P_N].any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(denoising_steps=(1000,)), "denoising_steps: expected a distill solver ('distill', 'distill_euler'), "
                                        "found 'unipc'"),
        (dict(solver="distill"), "denoising_steps: expected strictly decreasing whole numbers in 1..1000, found None"),
        (dict(solver="distill", num_inference_steps=2, denoising_steps=(500, 500)),
         "denoising_steps: expected strictly decreasing whole numbers in 1..1000, found (500, 500)"),
        (dict(solver="distill", num_inference_steps=1, denoising_steps=(0,)),
         "denoising_steps: expected strictly decreasing whole numbers in 1..1000, found (0,)"),
        (dict(solver="distill_euler", num_inference_steps=3, denoising_steps=(1000, 500)),
         "num_inference_steps: expected 2 (the length of denoising_steps), found 3"),
    ],
)
def test_make_schedule_refusals(kwargs, message):
    args = dict(solver="unipc", num_inference_steps=4, flow_shift=5.0) | kwargs
    with pytest.raises(ValueError) as info:
        schedulers.make_schedule(**args)
    assert str(info.value) == message


# ---------------------------------------------------------------------------------------------------------------
# Settings.


def test_distill_defaults_and_what_the_config_records():
    mesh = _mesh(2, 4)
    s = _config(mesh, sample_solver="distill").stage2
    assert (s.denoising_steps, s.num_inference_steps, s.guidance_scale, s.flow_shift) == (LIGHTX2V_STEPS, 4, 1.0, 5.0)
    assert s.batch_size == 2  # no CFG: dp holds two videos, not one video's cond/uncond pair
    assert _config(mesh, guidance_scale=5.0).stage2.batch_size == 1
    given = _config(mesh, sample_solver="distill_euler", denoising_steps=(900, 100), guidance_scale=3.0,
                    flow_shift=8.0).stage2
    assert (given.denoising_steps, given.num_inference_steps, given.guidance_scale, given.flow_shift) == (
        (900, 100), 2, 3.0, 8.0)
    data = _config(mesh, sample_solver="distill").to_json_dict()
    assert data["denoising_steps"] == list(LIGHTX2V_STEPS) and data["sample_solver"] == "distill"
    assert GenerationConfig.from_json_dict(data).stage2.denoising_steps == LIGHTX2V_STEPS
    assert "denoising_steps" not in _config(mesh).to_json_dict()  # other solvers' files are as before


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(sample_solver="unipc", denoising_steps=(1000, 500)),
         "--denoising_steps: expected --sample_solver distill or distill_euler, found --sample_solver unipc"),
        (dict(denoising_steps=(1000, 500)),
         "--denoising_steps: expected --sample_solver distill or distill_euler, found --sample_solver unipc"),
        (dict(sample_solver="distill", denoising_steps=(1000, 1000)),
         "--denoising_steps: expected strictly decreasing whole numbers in 1..1000, found 1000 1000"),
        (dict(sample_solver="distill", denoising_steps=(1001, 500)),
         "--denoising_steps: expected strictly decreasing whole numbers in 1..1000, found 1001 500"),
        (dict(sample_solver="distill", num_inference_steps=6),
         "--num_inference_steps: expected 4 with --sample_solver distill (the length of --denoising_steps 1000 750 "
         "500 250), found 6"),
        (dict(sample_solver="distill_euler", denoising_steps=(800, 200), num_inference_steps=4),
         "--num_inference_steps: expected 2 with --sample_solver distill_euler (the length of --denoising_steps 800 "
         "200), found 4"),
    ],
)
def test_settings_refusals(settings, message):
    with pytest.raises(ConfigError) as info:
        Stage2Settings(**settings)
    assert str(info.value) == message


def test_two_experts_switch_on_the_distilled_timesteps():
    # tiny-random-a14b's boundary 0.875 x 1000 against 1000, 937.5, 833.3, 625 (float32 comparison, as diffusers')
    mesh = _mesh(1, 1)
    cfg = _config(mesh, model_id=tiny.TINY_A14B_ID, sample_solver="distill")
    s = cfg.stage2
    assert s.expert_steps == ("transformer",) * 2 + ("transformer_2",) * 2
    assert (s.guidance_scale, s.guidance_scale_2, s.flow_shift) == (1.0, 1.0, 5.0)  # not the preset's 4 / 3, 12
    denoiser = pipeline.load_denoiser(tiny.ensure_tiny_checkpoint(model_id=tiny.TINY_A14B_ID), mesh, "float32", "auto")
    embeds = np.zeros((1, cfg.max_sequence_length, tiny.TEXT_DIM), np.float32)
    latents = pipeline.denoise(denoiser, cfg, embeds, embeds, progress=False)
    assert tuple(denoiser.expert_log) == s.expert_steps and np.isfinite(latents).all()


# ---------------------------------------------------------------------------------------------------------------
# End to end on the tiny model against the transcription driving diffusers' transformer.


@pytest.fixture(scope="module")
def embeds(tiny_path):
    encoder = pipeline.load_encoder(tiny_path, _mesh(1, 1), "float32")
    return pipeline.encode(encoder, _config(_mesh(1, 1)))


@pytest.fixture(scope="module")
def reference(tiny_path, embeds):
    """solver -> the transcription's latents driving diffusers' WanTransformer3DModel (float32) from SEED: one torch
    CPU generator, the initial latents drawn first, then one draw per re-noise (lightx2v's order)."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(tiny_path, subfolder="transformer", torch_dtype=torch.float32)
    text = torch.from_numpy(embeds[0])

    def velocity(x, t):
        with torch.no_grad():
            return model(hidden_states=torch.from_numpy(x.astype(np.float32)), timestep=torch.tensor(
                [t], dtype=torch.float32), encoder_hidden_states=text, return_dict=False)[0].numpy()

    out = {}
    for solver in ("distill", "distill_euler"):
        generator = torch.Generator("cpu").manual_seed(SEED)
        draw = lambda: torch.randn(LATENTS, generator=generator, dtype=torch.float32).numpy()  # noqa: E731
        out[solver] = transcription(solver, draw(), velocity, LIGHTX2V_STEPS, 5.0, draw)
    return out


_denoisers = {}


def _denoiser(tiny_path, dp, tp):
    if (dp, tp) not in _denoisers:
        _denoisers[dp, tp] = pipeline.load_denoiser(tiny_path, _mesh(dp, tp), "float32", "auto")
    return _denoisers[dp, tp]


@pytest.mark.parametrize("mesh", [(1, 1), (2, 4)], ids=lambda m: f"mesh{m[0]}x{m[1]}")
@pytest.mark.parametrize("solver", ["distill", "distill_euler"])
def test_end_to_end_equals_transcription_with_diffusers_transformer(tiny_path, embeds, reference, solver, mesh):
    cfg = _config(_mesh(*mesh), sample_solver=solver)
    latents = pipeline.denoise(_denoiser(tiny_path, *mesh), cfg, *embeds, progress=False)
    err = rel_err(latents, reference[solver])
    print(f"{solver} {mesh}: latents rel err {err:.2e}")
    assert err <= LATENT_RTOL


def test_renoising_matters(reference):
    # Guards the test above: fresh noise (distill) lands far from the deterministic update (distill_euler).
    assert rel_err(reference["distill"], reference["distill_euler"]) > 100 * LATENT_RTOL


def test_sweep_video_equals_its_single_run(tiny_path, embeds, caplog):
    # Two seeds in one batch on 2x4 (dp holds both videos), each with its own noise stream: every video equals
    # its own single run bit for bit, and the step (the last one's zero noise included) compiles once.
    mesh = _mesh(2, 4)
    denoiser = pipeline.load_denoiser(tiny_path, mesh, "float32", "auto")
    cfg = _config(mesh, sample_solver="distill", seeds=(SEED, SEED + 1))
    assert cfg.stage2.batch_size == 2
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        swept = pipeline.denoise(denoiser, cfg, *embeds, progress=False)
    compiles = [r for r in caplog.records if "Finished XLA compilation" in r.getMessage()
                and "_denoise_step" in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage() for r in compiles]
    for seed, latents in zip(cfg.stage2.seeds, swept):
        alone = pipeline.denoise(denoiser, cfg.replace(seeds=(seed,)), *embeds, progress=False)
        np.testing.assert_array_equal(latents, alone[0], err_msg=f"seed {seed}")
    assert rel_err(swept[0], swept[1]) > 0.1


def test_init_latents_keep_the_seeds_noise_stream(tiny_path, embeds, tmp_path):
    # --init_latents holding the seed's own initial draw gives the seeded run bit for bit: the stream still starts
    # with that draw, so the re-noise draws are the same.
    from tpu_wan.core import artifacts

    mesh = _mesh(1, 1)
    path = tmp_path / "start.safetensors"
    artifacts.save_latents(path, sweep.initial_noise(SEED, LATENTS))
    seeded = pipeline.denoise(_denoiser(tiny_path, 1, 1), _config(mesh, sample_solver="distill"), *embeds,
                              progress=False)
    started = pipeline.denoise(_denoiser(tiny_path, 1, 1), _config(mesh, sample_solver="distill",
                                                                  init_latents=str(path)), *embeds, progress=False)
    np.testing.assert_array_equal(started, seeded)


# ---------------------------------------------------------------------------------------------------------------
# No CFG: one transformer call per video, half the flops.


def test_no_cfg_step_calls_the_transformer_once_per_video(tiny_path, embeds, monkeypatch):
    # The forward is traced once per compiled step; what it is called on is what every step runs: B rows (one per
    # video) without CFG, 2B (each video's cond and uncond rows) with it.
    mesh = _mesh(1, 1)
    denoiser = pipeline.load_denoiser(tiny_path, mesh, "float32", "auto")
    rows, forward = [], denoiser.forward

    def counting(sharding="megatron"):
        fn = forward(sharding)

        def counted(weights, x, *args, **kwargs):
            rows.append(x.shape[0])
            return fn(weights, x, *args, **kwargs)

        return counted

    monkeypatch.setattr(denoiser, "forward", counting)
    pipeline.denoise(denoiser, _config(mesh, sample_solver="distill"), *embeds, progress=False)
    assert rows == [1]
    pipeline.denoise(denoiser, _config(mesh, guidance_scale=1.0, num_inference_steps=2), *embeds, progress=False)
    assert rows == [1, 1]
    pipeline.denoise(denoiser, _config(mesh, guidance_scale=5.0, num_inference_steps=2), *embeds, progress=False)
    assert rows == [1, 1, 2]
