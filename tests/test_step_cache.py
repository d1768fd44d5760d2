"""--cache: First Block Cache and MagCache inside our compiled step against diffusers' hooks (apply_first_block_cache,
apply_mag_cache through `transformer.enable_cache`) in WanPipeline on the tiny model: the same steps skipped per
branch and the same latents, on 1x1 and 2x4 in both sharding modes; the parsing, the schedule and the refusals."""

import contextlib
import io
import re

import jax
import numpy as np
import pytest
import torch
from conftest import (
    CACHE_LATENT_RTOL,
    FRAMES,
    HEIGHT,
    LATENT_RTOL,
    MAG_RATIO_RTOL,
    NEGATIVE,
    PROMPTS,
    SEED,
    STEPS,
    WIDTH,
    diffusers_run,
    rel_err,
)
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig
from diffusers.hooks.mag_cache import nearest_interp as diffusers_nearest_interp

from tpu_wan.core.config import GenerationConfig
from tpu_wan.core.errors import ConfigError
from tpu_wan.models.transformer import Denoiser
from tpu_wan.run import pipeline
from tpu_wan.runtime.mesh import make_mesh
from tpu_wan.sampling import step_cache

MESHES = {"1x1": (1, 1), "2x4": (2, 4)}


@pytest.fixture(scope="module")
def pipe(tiny_path):
    """diffusers' pipeline of our own (its transformer gets cache hooks, which the session's shared one must not)."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def embeds(pipe):
    """diffusers' embeddings of the parity prompt, given to both sides: only the denoising is compared."""
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPTS[0], NEGATIVE, max_sequence_length=512)
    return cond.numpy(), uncond.numpy()


@pytest.fixture(scope="module")
def denoisers(tiny_path):
    return {name: Denoiser(tiny_path, make_mesh(dp, tp, devices=jax.devices()[: dp * tp]), "float32")
            for name, (dp, tp) in MESHES.items()}


def _ours(denoiser, embeds, cache, guidance, sharding="megatron"):
    """(latents, step_cache.summary) of our stage 2 at the parity setting with --cache `cache`."""
    cfg = GenerationConfig(model_id="tiny-random", prompts=(PROMPTS[0],), negative_prompt=NEGATIVE)
    settings = pipeline.Stage2Settings(height=HEIGHT, width=WIDTH, frames=FRAMES, num_inference_steps=STEPS,
                                       guidance_scale=guidance, seeds=(SEED,), dtype="float32", sharding=sharding,
                                       cache=cache)
    cfg = pipeline.resolve_stage2(cfg, settings, denoiser.mesh)
    latents = pipeline.denoise(denoiser, cfg, *embeds, progress=False)
    return latents, denoiser.cache_log[-1]


def _theirs(pipe, embeds, config, guidance):
    """(latents, per-branch pattern of the transformer calls that ran the last block, stdout) of WanPipeline with
    the cache hooks of `config`. A forward pre-hook on the last block's self-attention fires only where the block
    really runs (the hooks replace the block's forward; a pre-hook on the block itself fires on every call)."""
    calls = []
    handles = [pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(False)),
               pipe.transformer.blocks[-1].attn1.register_forward_pre_hook(lambda *_: calls.__setitem__(-1, True))]
    pipe.transformer.enable_cache(config)
    out = io.StringIO()
    kwargs = dict(prompt_embeds=torch.from_numpy(embeds[0]))
    if guidance > 1:
        kwargs["negative_prompt_embeds"] = torch.from_numpy(embeds[1])
    try:
        with contextlib.redirect_stdout(out):
            latents = diffusers_run(pipe, None, guidance, "latent", **kwargs)
    finally:
        pipe.transformer.disable_cache()
        for h in handles:
            h.remove()
    branches = step_cache.BRANCHES[: 2 if guidance > 1 else 1]  # diffusers calls cond, then uncond, every step
    return latents, {b: calls[i::len(branches)] for i, b in enumerate(branches)}, out.getvalue()


def _diffusers_config(spec: step_cache.CacheSpec):
    if spec.kind == "first_block":
        return FirstBlockCacheConfig(threshold=spec.threshold)
    return MagCacheConfig(threshold=spec.threshold, max_skip_steps=spec.max_skip_steps, num_inference_steps=STEPS,
                          retention_ratio=spec.retention_ratio, calibrate=spec.calibrate,
                          mag_ratios=None if spec.calibrate else list(spec.mag_ratios))


def _compare(denoisers, pipe, embeds, cache, guidance, mesh="1x1", sharding="megatron"):
    latents, ran = _ours(denoisers[mesh], embeds, cache, guidance, sharding)
    ref, pattern, _ = _theirs(pipe, embeds, _diffusers_config(step_cache.parse(cache)), guidance)
    err = rel_err(latents, ref)
    print(f"{cache[:20]} guidance {guidance} {mesh} {sharding}: stacks run {ran['ran']} of {STEPS}, rel err {err:.2e}")
    assert ran["pattern"] == pattern
    assert err <= CACHE_LATENT_RTOL
    return ran


# First Block Cache on the tiny model at the parity setting (6 steps, unipc, shift 3). Block 0's residual change per
# step against the kept one, cond / uncond: step 2 0.0853 / 0.0856, then 0.097, 0.090, 0.106, 0.095. So 0.0855
# splits the branches at step 2 (cond skips, uncond runs: 5 and 6 tail runs of 6; the program runs the tail at every
# step), and 0.1 skips steps 2, 3 and 6 in both (3 of 6), as it does without guidance.
FIRST_BLOCK_CASES = [
    ("first_block:0.0855", 5.0, "1x1", "megatron", {"cond": 5, "uncond": 6}),
    ("first_block:0.1", 5.0, "1x1", "megatron", {"cond": 3, "uncond": 3}),
    ("first_block:0.1", 1.0, "1x1", "megatron", {"cond": 3}),
    ("first_block:0.0855", 5.0, "2x4", "megatron", {"cond": 5, "uncond": 6}),
    ("first_block:0.0855", 5.0, "2x4", "sequence", {"cond": 5, "uncond": 6}),
]


@pytest.mark.parametrize("cache, guidance, mesh, sharding, ran", FIRST_BLOCK_CASES,
                         ids=["split-branches", "both-skip", "no-cfg", "2x4-megatron", "2x4-sequence"])
def test_first_block_cache_matches_diffusers(denoisers, pipe, embeds, cache, guidance, mesh, sharding, ran):
    assert _compare(denoisers, pipe, embeds, cache, guidance, mesh, sharding)["ran"] == ran


@pytest.fixture(scope="module")
def calibration(denoisers, embeds):
    """(latents, summary) of our mag:calibrate run on 1x1 with guidance."""
    return _ours(denoisers["1x1"], embeds, "mag:calibrate", 5.0)


def test_mag_calibration_matches_diffusers(calibration, pipe, embeds):
    latents, ran = calibration
    ref, pattern, printed = _theirs(pipe, embeds, _diffusers_config(step_cache.parse("mag:calibrate")), 5.0)
    assert ran["pattern"] == pattern == {b: [True] * STEPS for b in step_cache.BRANCHES}  # calibration skips nothing
    assert rel_err(latents, ref) <= CACHE_LATENT_RTOL
    # diffusers prints each context's ratios when its last step ends: cond's, then uncond's
    theirs = [eval(line) for line in re.findall(r"^\[1\.0, .*\]$", printed, flags=re.M)]
    ours = [ran["mag_ratios"][b] for b in step_cache.BRANCHES]
    print("mag ratios ours", ours, "diffusers", theirs)
    np.testing.assert_allclose(ours, theirs, rtol=MAG_RATIO_RTOL)


# MagCache with the tiny model's calibrated cond ratios (1.0, 1.0006, 1.0112, 0.9837, 1.0131, 0.9900), threshold
# 0.015, max 3 skips, retention 0.2 (step 0 always runs): the error |1 - product| accumulates 0.0006 (skip), 0.0124
# (skip), 0.0171 (run, reset), 0.0131 (skip), 0.0160 (run): 3 of 6 full steps per branch, both branches alike.
MAG_CASES = [(5.0, "1x1", "megatron"), (1.0, "1x1", "megatron"), (5.0, "2x4", "megatron"), (5.0, "2x4", "sequence")]


@pytest.mark.parametrize("guidance, mesh, sharding", MAG_CASES, ids=["cfg", "no-cfg", "2x4-megatron", "2x4-sequence"])
def test_mag_cache_matches_diffusers(calibration, denoisers, pipe, embeds, guidance, mesh, sharding):
    ratios = ",".join(repr(r) for r in calibration[1]["mag_ratios"]["cond"])
    cache = f"mag:0.015:{ratios}"
    ran = _compare(denoisers, pipe, embeds, cache, guidance, mesh, sharding)
    assert ran["ran"] == {b: 3 for b in step_cache.BRANCHES[: 2 if guidance > 1 else 1]} and ran["computed"] == 3
    if guidance > 1:  # the skips change the result far beyond the tolerance: the comparison has power
        assert rel_err(_ours(denoisers[mesh], embeds, cache, guidance, sharding)[0], calibration[0]) > 100 * LATENT_RTOL


@pytest.mark.parametrize("length", [1, 4, 6, 10, 50])
def test_ratios_of_another_length_are_interpolated_as_diffusers_does(length):
    ratios = np.linspace(0.9, 1.1, 13, dtype=np.float32)
    np.testing.assert_array_equal(step_cache.nearest_interp(ratios, length),
                                  diffusers_nearest_interp(torch.from_numpy(ratios), length).numpy())


@pytest.mark.parametrize("threshold, ratios, max_skip, retention", [
    (0.06, (1.0, 1.01, 0.99, 1.02, 1.0, 0.98, 1.0), 3, 0.2),  # 7 ratios for 9 steps: interpolated
    (0.03, (1.0,) + (1.001,) * 11, 2, 0.0),  # more ratios than steps; the skip limit decides
    (0.3, (1.0, 0.9, 1.2, 0.8, 1.1, 1.0, 1.3, 0.7, 1.0), 3, 0.5),
])
def test_mag_schedule_is_diffusers_head_hook(pipe, threshold, ratios, max_skip, retention):
    # diffusers' MagCache decides on the step index alone: drive its hooks with 9 calls of the tiny transformer on
    # small inputs and count the calls that ran block 0.
    steps = 9
    spec = step_cache.CacheSpec("mag", threshold, ratios, max_skip, retention)
    config = MagCacheConfig(threshold=threshold, mag_ratios=list(ratios), max_skip_steps=max_skip,
                            retention_ratio=retention, num_inference_steps=steps)
    ran = []
    handle = pipe.transformer.blocks[0].attn1.register_forward_pre_hook(lambda *_: ran.__setitem__(-1, True))
    pipe.transformer.enable_cache(config)
    x, text = torch.randn(1, 16, 1, 4, 4), torch.randn(1, 8, 32)
    try:
        with torch.no_grad():
            for i in range(steps):
                ran.append(False)
                with pipe.transformer.cache_context("cond"):
                    pipe.transformer(x, torch.tensor([999.0 - 100 * i]), text, return_dict=False)
    finally:
        pipe.transformer.disable_cache()
        handle.remove()
    schedule = step_cache.mag_schedule(spec, steps)
    print(schedule.astype(int))
    assert list(schedule) == ran and 0 < sum(ran) < steps


def test_parse_and_canonical_text():
    assert str(step_cache.parse("first_block:0.05")) == "first_block:0.05"
    assert step_cache.parse("mag:calibrate") == step_cache.CacheSpec("mag", calibrate=True)
    spec = step_cache.parse("mag:0.06:1.0,0.98,1.02")
    assert (spec.mag_ratios, spec.max_skip_steps, spec.retention_ratio) == ((1.0, 0.98, 1.02), 3, 0.2)
    assert str(spec) == "mag:0.06:1.0,0.98,1.02:3:0.2" and step_cache.parse(str(spec)) == spec
    assert step_cache.parse("mag:0.1:1.0,1.0:5:0.5") == step_cache.CacheSpec("mag", 0.1, (1.0, 1.0), 5, 0.5)


@pytest.mark.parametrize("text, expect", [
    ("teacache:0.1", "--cache: expected first_block:THRESHOLD, mag:THRESHOLD:RATIOS"),
    ("first_block", "found 'first_block'"),
    ("first_block:abc", "found 'first_block:abc'"),
    ("first_block:-0.1", "--cache first_block: expected a threshold >= 0, found -0.1"),
    ("mag:0.06", "--cache mag: expected the model's magnitude ratios"),
    ("mag:0.06:1.0,0,1.0", "--cache mag: expected finite ratios > 0, found 0.0"),
    ("mag:0.06:1.0:0", "expected MAX_SKIP_STEPS >= 1, found 0"),
    ("mag:0.06:1.0:3:1.5", "expected RETENTION_RATIO in [0, 1], found 1.5"),
])
def test_bad_values_are_refused(text, expect):
    with pytest.raises(ConfigError, match=re.escape(expect)):
        step_cache.parse(text)


def test_refused_with_distill_solvers_and_two_experts():
    with pytest.raises(ConfigError, match="--cache: expected a full-step solver .* found --sample_solver distill"):
        step_cache.check("first_block:0.05", "distill", ("transformer",))
    with pytest.raises(ConfigError, match=r"--cache: expected a model with one transformer, found two experts"):
        step_cache.check("mag:calibrate", "unipc", ("transformer", "transformer_2"))
    assert step_cache.check(None, "distill", ("transformer",)) is None


def test_metrics_record_the_stacks_and_the_ratios(tmp_path, tiny_path):
    # generate_flax.py's engine with a warmup (its steps are not counted) and two batches: the counts are the run's.
    from tpu_wan.run import oneshot

    settings = pipeline.Stage2Settings(height=32, width=32, frames=5, num_inference_steps=3, guidance_scale=5.0,
                                       seeds=(1, 2), batch_size=1, cache="mag:calibrate")
    result = oneshot.generate("tiny-random", [PROMPTS[0]], NEGATIVE, settings, output_dir=tmp_path, dp=2, tp=4,
                              warmup_steps=1)
    m = result.metrics["stages"]["transformer"]
    assert result.metrics["config"]["cache"] == "mag:calibrate"
    assert m["steps"] == 6 and m["block_stacks_run"] == {"cond": 6, "uncond": 6} and m["block_stacks_computed"] == 6
    assert [len(r) for r in m["mag_ratios"].values()] == [3, 3] and m["mag_ratios"]["cond"][0] == 1.0
