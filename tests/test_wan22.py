"""Wan 2.2 against diffusers' WanPipeline on the same tiny weights: the two-expert A14B layout (tiny-random-a14b) and
TI2V-5B's per-token timesteps over the z48 VAE (tiny-random-ti2v). Latents and frames on 1x1 and 2x4 in both
sharding modes, the expert of every step, one compiled step for both experts, the idle expert offloaded, bf16, and
the three stage scripts against generate_flax.py with what generation_config.json records."""

import logging

import jax
import numpy as np
import pytest
import torch
from conftest import (
    BF16_MIN_SHARE,
    BF16_OVER_DIFFUSERS,
    FRAMES,
    FRAMES_ATOL,
    HEIGHT,
    LATENT_RTOL,
    MODULE_RTOL,
    NEGATIVE,
    SEED,
    STEPS,
    rel_err,
)
from scripts import GENERATE, STAGE1, STAGE2, STAGE3, run_in_process

from tpu_wan.core import artifacts, preview, report, video
from tpu_wan.core.config import GenerationConfig, Stage2Settings
from tpu_wan.models import tiny
from tpu_wan.run import oneshot, pipeline, sweep
from tpu_wan.runtime.mesh import make_mesh

A14B, TI2V = tiny.TINY_A14B_ID, tiny.TINY_TI2V_ID
FAMILIES = (A14B, TI2V)
WIDTH = 64  # TI2V-5B's sizes are multiples of 32 (16x VAE, 2x2 patches); HEIGHT = 32 from conftest
PROMPT = "A cat playing piano in a jazz club"
# Each family's preset sampling (config.MODEL_PRESETS). A14B at shift 12 over STEPS = 6 runs its high-noise expert
# for timesteps 999-899 (4 steps) and the low-noise one for 2.
SAMPLING = {
    A14B: dict(guidance_scale=4.0, guidance_scale_2=3.0, flow_shift=12.0),
    TI2V: dict(guidance_scale=5.0, flow_shift=5.0),
}
A14B_EXPERTS = ("transformer",) * 4 + ("transformer_2",) * 2


def _settings(family, **changes):
    return Stage2Settings(**{**dict(height=HEIGHT, width=WIDTH, frames=FRAMES, num_inference_steps=STEPS,
                                    seeds=(SEED,), dtype="float32"), **SAMPLING[family], **changes})


def _config(family, mesh, **changes):
    cfg = GenerationConfig(model_id=family, prompts=(PROMPT,), negative_prompt=NEGATIVE)
    return pipeline.resolve_stage2(cfg, _settings(family, **changes), mesh)


def _mesh(dp, tp):
    return make_mesh(dp, tp, devices=jax.devices()[: dp * tp])


class Reference:
    """diffusers' WanPipeline on a tiny family's folder, counting which expert each transformer call ran."""

    def __init__(self, family, dtype=torch.float32):
        from diffusers import AutoencoderKLWan, WanPipeline

        path = tiny.ensure_tiny_checkpoint(model_id=family)
        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32)
        self.pipe = WanPipeline.from_pretrained(path, vae=vae, dtype=dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.family, self.calls = family, []
        for name in ("transformer", "transformer_2"):
            module = getattr(self.pipe, name)
            if module is not None:
                module.register_forward_pre_hook(lambda *_, name=name: self.calls.append(name))

    def run(self, output_type, **kwargs):
        """(latents or frames, the expert of each step) at the test's setting, with our scheduler's settings."""
        from conftest import diffusers_scheduler

        sampling = dict(SAMPLING[self.family])
        self.pipe.scheduler = diffusers_scheduler("unipc", sampling.pop("flow_shift"))
        self.calls.clear()
        with torch.no_grad():
            out = self.pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                            num_inference_steps=STEPS, output_type=output_type,
                            generator=torch.Generator("cpu").manual_seed(SEED), **sampling, **kwargs).frames
        out = out.float().numpy() if output_type == "latent" else out
        return out, tuple(self.calls[::2])  # guided: a cond and an uncond call per step, the same expert


@pytest.fixture(scope="module")
def references():
    refs = {family: Reference(family) for family in FAMILIES}
    return {family: (ref, *ref.run("latent"), ref.run("np")[0]) for family, ref in refs.items()}


_generators = {}  # (family, mesh, dtype) -> Generator, shared by the tests of this module


def _generator(family, dp, tp, dtype="float32"):
    key = (family, dp, tp, dtype)
    if key not in _generators:
        _generators[key] = oneshot.Generator(family, _mesh(dp, tp), text_dtype=dtype, dtype=dtype)
    return _generators[key]


@pytest.mark.parametrize("sharding", ["megatron", "sequence"])
@pytest.mark.parametrize("mesh", [(1, 1), (2, 4)], ids=lambda m: f"mesh{m[0]}x{m[1]}")
@pytest.mark.parametrize("family", FAMILIES)
def test_latents_frames_and_experts_match_diffusers(references, family, mesh, sharding):
    if mesh == (1, 1) and sharding == "sequence":
        pytest.skip("one device: both modes are one program")
    gen = _generator(family, *mesh)
    cfg = _config(family, _mesh(*mesh), sharding=sharding)
    gen.denoiser.expert_log.clear()
    _, _, latents, _ = gen.run(cfg, progress=False)
    _, ref_latents, ref_experts, ref_frames = references[family]
    err = rel_err(latents, ref_latents)
    print(f"{family} {mesh} {sharding}: latents rel err {err:.2e}")
    assert latents.shape == ref_latents.shape == (1, 48 if family == TI2V else 16, 3, *(
        (HEIGHT // 16, WIDTH // 16) if family == TI2V else (HEIGHT // 8, WIDTH // 8)))
    assert err <= LATENT_RTOL
    # the expert of each step: what the config records, what ran, what diffusers ran
    expected = A14B_EXPERTS if family == A14B else ("transformer",) * STEPS
    assert ref_experts == expected
    assert tuple(gen.denoiser.expert_log) == expected
    assert cfg.stage2.expert_steps == (expected if family == A14B else None)
    # frames: the same latents through our decoder and diffusers'
    frames = gen.decoder.decode(ref_latents)
    assert frames.shape == ref_frames.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    print(f"frames max abs err {np.abs(frames - ref_frames).max():.2e}")
    np.testing.assert_allclose(frames, ref_frames, rtol=0, atol=FRAMES_ATOL)


def test_per_token_timesteps_equal_one_timestep_per_video_in_text_to_video():
    # WanPipeline gives a TI2V model t on every token ([B, L]); our step passes the scalar (every token's t is the
    # same in text-to-video, and the model embeds each token's t alone): the same numbers up to XLA fusing the
    # broadcast modulation differently on 2x4 (float32 rounding, measured 4.2e-7 relative for the step, a few ulp
    # as MODULE_RTOL allows; the full runs above equal diffusers either way).
    denoiser = _generator(TI2V, 2, 4).denoiser
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 48, 3, HEIGHT // 16, WIDTH // 16)).astype(np.float32)
    embeds = rng.standard_normal((2, 16, tiny.TEXT_DIM)).astype(np.float32)
    tokens = 3 * (HEIGHT // 32) * (WIDTH // 32)  # F x H/2 x W/2 of the 1x2x2 patches
    forward = jax.jit(lambda w, x, t, e: denoiser.forward()(w, x, t, e, return_dict=False)[0])
    t = np.float32(875.0)
    per_video = forward(denoiser.weights, x, np.full((2,), t), embeds)
    per_token = forward(denoiser.weights, x, np.full((2, tokens), t), embeds)
    print(f"one forward, per-video vs per-token timesteps: rel err {rel_err(per_video, per_token):.2e}")
    assert rel_err(per_video, per_token) <= MODULE_RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_our_kernel_from_diffusers_init_latents_gives_diffusers_latents(references, family, tmp_path):
    # --attention custom (our Pallas kernel, interpreted on CPU, every attention call of the DiT, sharded on 2x4)
    # starting from --init_latents that diffusers' prepare_latents drew with another seed.
    import safetensors.torch

    from tpu_wan.models.transformer import Denoiser

    reference = references[family][0]
    start = reference.pipe.prepare_latents(1, 48 if family == TI2V else 16, HEIGHT, WIDTH, FRAMES, torch.float32,
                                           torch.device("cpu"), torch.Generator("cpu").manual_seed(1234))
    path = tmp_path / "start.safetensors"
    safetensors.torch.save_file({"latents": start}, path)
    gen = _generator(family, 2, 4)
    denoiser = Denoiser(tiny.ensure_tiny_checkpoint(model_id=family), gen.denoiser.mesh, "float32", "custom")
    cfg = _config(family, _mesh(2, 4), init_latents=str(path))
    latents = pipeline.denoise(denoiser, cfg, *pipeline.encode(gen.encoder, cfg), progress=False)
    ref, experts = reference.run("latent", latents=start)
    print(f"{family} custom kernel from init_latents: latents rel err {rel_err(latents, ref):.2e}")
    assert rel_err(latents, ref) <= LATENT_RTOL
    assert tuple(denoiser.expert_log) == experts


def test_the_experts_differ_and_the_guidance_follows_the_expert(references):
    # The parity test's power: running the low-noise expert's steps with the high-noise expert, or with the
    # high-noise guidance, moves the latents far beyond LATENT_RTOL.
    gen = _generator(A14B, 1, 1)
    _, ref_latents, _, _ = references[A14B]
    one_expert = _config(A14B, _mesh(1, 1)).replace(expert_steps=("transformer",) * STEPS)
    one_guidance = _config(A14B, _mesh(1, 1), guidance_scale_2=4.0)
    for cfg in (one_expert, one_guidance):
        latents = gen.run(cfg, progress=False)[2]
        assert rel_err(latents, ref_latents) > 100 * LATENT_RTOL


def test_both_experts_run_one_compiled_step(caplog):
    # A sweep of two batches, each through both experts: one compilation of the step.
    from tpu_wan.models.transformer import Denoiser

    path = tiny.ensure_tiny_checkpoint(model_id=A14B)
    denoiser = Denoiser(path, _mesh(1, 1), "float32", "xla")
    cfg = _config(A14B, _mesh(1, 1), seeds=(SEED, SEED + 1), batch_size=1)
    embeds = np.zeros((1, cfg.max_sequence_length, tiny.TEXT_DIM), np.float32)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        sweep.denoise_videos(denoiser, cfg, embeds, embeds, pipeline.plan(cfg), pipeline.plan(cfg),
                             lambda *_: None, progress=False)
    compiles = [r for r in caplog.records if "Finished XLA compilation" in r.getMessage()
                and "_denoise_step" in r.getMessage()]
    assert denoiser.expert_log == list(A14B_EXPERTS) * 2
    assert len(compiles) == 1, [r.getMessage() for r in compiles]


@pytest.mark.parametrize("mesh", [(1, 1), (2, 4)], ids=lambda m: f"mesh{m[0]}x{m[1]}")
def test_expert_offload_swaps_at_the_boundary_and_changes_no_bit(mesh):
    gen = _generator(A14B, *mesh)
    mesh = _mesh(*mesh)
    cfg = _config(A14B, mesh, seeds=(SEED, SEED + 1), batch_size=1)  # two batches: swap, swap back, swap
    expected = gen.run(cfg, progress=False)[2]
    offloaded = pipeline.load_denoiser(tiny.ensure_tiny_checkpoint(model_id=A14B), mesh, "float32", "auto",
                                       expert_offload=True)
    assert list(offloaded.experts) == ["transformer"]  # the idle expert starts in host memory
    prompt_embeds, negative_embeds = pipeline.encode(gen.encoder, cfg)
    latents = pipeline.denoise(offloaded, cfg, prompt_embeds, negative_embeds, progress=False)
    np.testing.assert_array_equal(latents, expected)
    assert len(offloaded.swap_seconds) == 3
    assert list(offloaded.experts) == ["transformer_2"]


def test_guidance_scale_2_defaults_as_diffusers():
    # Neither given: the preset's pair; --guidance_scale alone: both experts take it (diffusers' default).
    mesh = _mesh(1, 1)
    cfg = GenerationConfig(model_id=A14B, prompts=(PROMPT,), negative_prompt=NEGATIVE)
    preset = pipeline.resolve_stage2(cfg, Stage2Settings(), mesh).stage2
    assert (preset.guidance_scale, preset.guidance_scale_2, preset.boundary_ratio, preset.flow_shift) == (
        4.0, 3.0, tiny.A14B_BOUNDARY_RATIO, 12.0)
    assert pipeline.resolve_stage2(cfg, Stage2Settings(guidance_scale=6.0), mesh).stage2.guidance_scale_2 == 6.0


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_is_as_close_to_float32_as_diffusers_bf16(references, family):
    reference, ref_latents, _, _ = references[family]
    diffusers_bf16 = Reference(family, torch.bfloat16).run("latent")[0]
    gen = _generator(family, 1, 1, "bfloat16")
    latents = gen.run(_config(family, _mesh(1, 1), dtype="bfloat16"), progress=False)[2]
    ours, theirs = rel_err(latents, ref_latents), rel_err(diffusers_bf16, ref_latents)
    print(f"{family} bf16 latents: ours {ours:.2e}, diffusers {theirs:.2e} ({ours / theirs:.2f}x)")
    assert BF16_MIN_SHARE * theirs <= ours <= BF16_OVER_DIFFUSERS * theirs


SIZE = ("--height", HEIGHT, "--width", WIDTH, "--frames", FRAMES, "--num_inference_steps", STEPS, "--seed", SEED)
MESH = ("--dp", "2", "--tp", "4")


@pytest.fixture(scope="module", params=FAMILIES)
def staged_and_one_process(request, tmp_path_factory):
    """The three stage scripts and generate_flax.py on a family (in this process, the 2x4 mesh, the preset's
    guidance and shift)."""
    family = request.param
    staged, one = tmp_path_factory.mktemp("staged"), tmp_path_factory.mktemp("one_process")
    for script, args in ((STAGE1, ("--model_id", family, "--prompt", PROMPT, "--negative_prompt", NEGATIVE,
                                   "--output_dir", staged)),
                         (STAGE2, ("--input_dir", staged, *SIZE)),
                         (STAGE3, ("--input_dir", staged, "--save_frames", "--preview"))):
        assert run_in_process(script, [*args, *MESH]) == 0
    assert run_in_process(GENERATE, ["--model_id", family, "--prompt", PROMPT, "--negative_prompt", NEGATIVE, *SIZE,
                                     *MESH, "--warmup_steps", "1", "--output_video", one / "video.mp4",
                                     "--save_intermediates", one]) == 0
    return family, staged, one


def test_stages_equal_generate_flax_and_diffusers(staged_and_one_process, references):
    family, staged, one = staged_and_one_process
    latents = artifacts.load_latents(staged / artifacts.LATENTS_FILE)
    np.testing.assert_array_equal(latents, artifacts.load_latents(one / artifacts.LATENTS_FILE))
    np.testing.assert_array_equal(artifacts.load_frames(staged), artifacts.load_frames(one))
    _, ref_latents, _, ref_frames = references[family]
    assert rel_err(latents, ref_latents) <= LATENT_RTOL
    np.testing.assert_allclose(artifacts.load_frames(staged), ref_frames, rtol=0, atol=FRAMES_ATOL)
    frames, fps = video.read_video(staged / artifacts.VIDEO_FILE)
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert fps == (24 if family == TI2V else 16)  # TI2V-5B's 24 fps, Wan's own default for it
    assert preview.preview_path(staged / artifacts.VIDEO_FILE).is_file()
    # the report of the one-process run names the experts of an A14B run
    text = report.render(report.load_metrics(one / artifacts.METRICS_FILE))
    assert ("- experts: transformer for 4 steps (guidance 4.0), then transformer_2 for 2 (guidance 3.0); boundary "
            "ratio 0.875" in text) == (family == A14B)


def test_the_config_records_what_decides_the_video(staged_and_one_process):
    family, staged, one = staged_and_one_process
    recorded = artifacts.load_config(staged)
    assert recorded == artifacts.load_config(one) | {"text_dtype": recorded["text_dtype"]}
    wan22 = {key: recorded.get(key) for key in ("guidance_scale", "guidance_scale_2", "boundary_ratio",
                                                "expert_steps", "expand_timesteps", "vae", "flow_shift")}
    if family == A14B:
        assert wan22 == dict(guidance_scale=4.0, guidance_scale_2=3.0, boundary_ratio=0.875,
                             expert_steps=list(A14B_EXPERTS), expand_timesteps=None, vae=None, flow_shift=12.0)
        assert "expand_timesteps" not in recorded and "vae" not in recorded
    else:
        assert wan22 == dict(guidance_scale=5.0, guidance_scale_2=None, boundary_ratio=None, expert_steps=None,
                             expand_timesteps=True, vae="wan2.2", flow_shift=5.0)
        assert "guidance_scale_2" not in recorded and "expert_steps" not in recorded


def test_a_rerun_resumes_and_other_settings_are_refused(staged_and_one_process, capsys):
    family, staged, _ = staged_and_one_process
    latents = staged / artifacts.LATENTS_FILE
    before = latents.stat().st_mtime_ns
    assert run_in_process(STAGE2, ["--input_dir", staged, *SIZE, *MESH]) == 0  # nothing left to do
    assert latents.stat().st_mtime_ns == before
    # a setting only Wan 2.2 records is part of what a folder's results are tied to
    changed, named = ((("--guidance_scale_2", "2.0"), "guidance_scale_2: 3.0 -> 2.0") if family == A14B else
                      (("--flow_shift", "4.0"), "flow_shift: 5.0 -> 4.0"))
    capsys.readouterr()
    assert run_in_process(STAGE2, ["--input_dir", staged, *SIZE, *MESH, *changed]) == 2
    assert named in capsys.readouterr().err
    assert latents.stat().st_mtime_ns == before
