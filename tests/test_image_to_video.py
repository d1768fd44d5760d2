"""Image to video against diffusers' WanImageToVideoPipeline on the same tiny folders, image, prompt and seed:
Wan 2.1 I2V (tiny-random-i2v: CLIP embeddings, mask and first-frame latents), Wan 2.2 I2V-A14B (tiny-random-i2v-a14b:
two experts, mask and latents, a last frame too) and TI2V-5B given an image (tiny-random-ti2v: the first latent
frame replaced, per-token timesteps)."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from conftest import EMBED_RTOL, FRAMES, FRAMES_ATOL, HEIGHT, LATENT_RTOL, NEGATIVE, SEED, diffusers_scheduler, rel_err
from scripts import GENERATE, STAGE1, STAGE2, STAGE3, run_in_process

from tpu_wan.core import artifacts
from tpu_wan.core.config import GenerationConfig, Stage2Settings
from tpu_wan.models import image_encoder, tiny
from tpu_wan.run import oneshot, pipeline
from tpu_wan.runtime.mesh import make_mesh

I2V, I2V_A14B, TI2V = tiny.TINY_I2V_ID, tiny.TINY_I2V_A14B_ID, tiny.TINY_TI2V_ID
KINDS = (I2V, I2V_A14B, TI2V)
STEPS = 4  # UniPC's first, second-order and final steps; A14B at shift 5.0 switches experts after step 1
PROMPT = "The cat turns its head and looks at the camera"
WIDTH = {I2V: 48, I2V_A14B: 48, TI2V: 64}  # TI2V's sizes are multiples of 32
SAMPLING = {  # each kind's preset guidance and shift (config.MODEL_PRESETS)
    I2V: dict(guidance_scale=5.0, flow_shift=3.0),
    I2V_A14B: dict(guidance_scale=3.5, guidance_scale_2=3.5, flow_shift=5.0),
    TI2V: dict(guidance_scale=5.0, flow_shift=5.0),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """(first image, last image) files of other sizes and aspect ratios than the video: resized as diffusers does."""
    import PIL.Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    first, last = folder / "first.png", folder / "last.jpg"
    PIL.Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8)).save(first)
    PIL.Image.fromarray(rng.integers(0, 256, (50, 30, 3), np.uint8)).save(last, quality=95)
    return first, last


def _pipe(kind):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(tiny.ensure_tiny_checkpoint(model_id=kind), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load(path):
    return image_encoder.load_image(path)


def diffusers_video(pipe, kind, first, last=None, output_type="latent"):
    sampling = dict(SAMPLING[kind])
    pipe.scheduler = diffusers_scheduler("unipc", sampling.pop("flow_shift"))
    with torch.no_grad():
        out = pipe(image=_load(first), last_image=None if last is None else _load(last), prompt=PROMPT,
                   negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH[kind], num_frames=FRAMES,
                   num_inference_steps=STEPS, output_type=output_type,
                   generator=torch.Generator("cpu").manual_seed(SEED), **sampling).frames
    return out.float().numpy() if output_type == "latent" else out


@pytest.fixture(scope="module")
def references(images):
    """kind -> (diffusers' latents, frames); I2V-A14B also with the last image ('a14b-last': latents)."""
    out = {}
    for kind in KINDS:
        pipe = _pipe(kind)
        out[kind] = diffusers_video(pipe, kind, images[0]), diffusers_video(pipe, kind, images[0], output_type="np")
        if kind == I2V_A14B:
            out["a14b-last"] = diffusers_video(pipe, kind, *images)
    return out


def _mesh(dp, tp):
    return make_mesh(dp, tp, devices=jax.devices()[: dp * tp])


_generators = {}


def _generator(kind, dp, tp):
    if (kind, dp, tp) not in _generators:
        _generators[kind, dp, tp] = oneshot.Generator(kind, _mesh(dp, tp), text_dtype="float32", dtype="float32",
                                                      images=True)
    return _generators[kind, dp, tp]


def _config(kind, mesh, first, last=None, **changes):
    request = pipeline.image_request(kind, 1, [str(first)], None if last is None else [str(last)],
                                     (HEIGHT, WIDTH[kind], FRAMES))
    cfg = pipeline.with_images(GenerationConfig(model_id=kind, prompts=(PROMPT,), negative_prompt=NEGATIVE), request)
    settings = Stage2Settings(**{"num_inference_steps": STEPS, "seeds": (SEED,), "dtype": "float32",
                                 **SAMPLING[kind], **changes})
    return pipeline.resolve_stage2(cfg, settings, mesh)


@pytest.mark.parametrize("sharding", ["megatron", "sequence"])
@pytest.mark.parametrize("mesh", [(1, 1), (2, 4)], ids=lambda m: f"mesh{m[0]}x{m[1]}")
@pytest.mark.parametrize("kind", KINDS)
def test_latents_and_frames_match_diffusers(references, images, kind, mesh, sharding):
    if mesh == (1, 1) and sharding == "sequence":
        pytest.skip("one device: both modes are one program")
    gen = _generator(kind, *mesh)
    _, _, latents, frames = gen.run(_config(kind, _mesh(*mesh), images[0], sharding=sharding), progress=False)
    ref_latents, ref_frames = references[kind]
    err = rel_err(latents, ref_latents)
    print(f"{kind} {mesh} {sharding}: latents rel err {err:.2e}")
    assert latents.shape == ref_latents.shape
    assert err <= LATENT_RTOL
    np.testing.assert_allclose(frames, ref_frames, rtol=0, atol=FRAMES_ATOL)


@pytest.mark.parametrize("mesh", [(1, 1), (2, 4)], ids=lambda m: f"mesh{m[0]}x{m[1]}")
def test_last_frame_matches_diffusers(references, images, mesh):
    gen = _generator(I2V_A14B, *mesh)
    latents = gen.run(_config(I2V_A14B, _mesh(*mesh), *images), progress=False)[2]
    err = rel_err(latents, references["a14b-last"])
    print(f"I2V-A14B with a last frame {mesh}: latents rel err {err:.2e}")
    assert err <= LATENT_RTOL
    assert rel_err(latents, references[I2V_A14B][0]) > 1e-2  # the last frame conditions the video


@pytest.mark.parametrize("mesh", [(1, 1), (2, 4)], ids=lambda m: f"mesh{m[0]}x{m[1]}")
@pytest.mark.parametrize("kind", KINDS)
def test_image_tensors_match_diffusers(images, kind, mesh):
    """Stage 1's image embeddings (CLIP's second-to-last hidden states) and conditioning latents (the mask and the
    encoded video's mode, normalised; TI2V: the image's latents) against the pipeline's own encode_image and
    prepare_latents."""
    pipe = _pipe(kind)
    gen = _generator(kind, *mesh)
    cfg = _config(kind, _mesh(*mesh), *images if kind == I2V_A14B else images[:1])
    ours = gen.encode_images(cfg)
    first = pipe.video_processor.preprocess(_load(images[0]), height=HEIGHT, width=WIDTH[kind])
    last = None if kind != I2V_A14B else pipe.video_processor.preprocess(_load(images[1]), height=HEIGHT,
                                                                          width=WIDTH[kind])
    with torch.no_grad():
        prepared = pipe.prepare_latents(first, 1, pipe.vae.config.z_dim, HEIGHT, WIDTH[kind], FRAMES, torch.float32,
                                        "cpu", torch.Generator().manual_seed(SEED), None, last)
        embeds = pipe.encode_image(_load(images[0]), "cpu").numpy() if kind == I2V else None
    assert sorted(ours) == (["image_condition", "image_embeds"] if kind == I2V else ["image_condition"])
    assert rel_err(ours["image_condition"], prepared[1].numpy()) <= EMBED_RTOL
    if kind == I2V:
        assert rel_err(ours["image_embeds"], embeds) <= EMBED_RTOL


@pytest.fixture(scope="module", params=KINDS)
def staged_and_one_process(request, images, tmp_path_factory):
    """The three stage scripts with --image and generate_flax.py --image on a kind (in this process, 2x4)."""
    kind = request.param
    staged, one = tmp_path_factory.mktemp("staged"), tmp_path_factory.mktemp("one_process")
    size = ("--height", HEIGHT, "--width", WIDTH[kind], "--frames", FRAMES)
    sampling = ("--num_inference_steps", STEPS, "--seed", SEED)
    mesh = ("--dp", "2", "--tp", "4")
    for script, args in ((STAGE1, ("--model_id", kind, "--prompt", PROMPT, "--negative_prompt", NEGATIVE,
                                   "--image", images[0], *size, "--output_dir", staged)),
                         (STAGE2, ("--input_dir", staged, *sampling)),
                         (STAGE3, ("--input_dir", staged, "--save_frames"))):
        assert run_in_process(script, [*args, *mesh]) == 0
    assert run_in_process(GENERATE, ["--model_id", kind, "--prompt", PROMPT, "--negative_prompt", NEGATIVE,
                                     "--image", images[0], *size, *sampling, *mesh, "--warmup_steps", "1",
                                     "--output_video", one / "video.mp4", "--save_intermediates", one]) == 0
    return kind, staged, one


def test_stages_equal_generate_flax_and_diffusers(staged_and_one_process, references):
    kind, staged, one = staged_and_one_process
    latents = artifacts.load_latents(staged / artifacts.LATENTS_FILE)
    np.testing.assert_array_equal(latents, artifacts.load_latents(one / artifacts.LATENTS_FILE))
    np.testing.assert_array_equal(artifacts.load_frames(staged), artifacts.load_frames(one))
    for key, value in artifacts.load_image_tensors(staged).items():
        np.testing.assert_array_equal(value, artifacts.load_image_tensors(one)[key])
    ref_latents, ref_frames = references[kind]
    assert rel_err(latents, ref_latents) <= LATENT_RTOL
    np.testing.assert_allclose(artifacts.load_frames(staged), ref_frames, rtol=0, atol=FRAMES_ATOL)
    config = artifacts.load_config(staged)
    assert config["image_size"] == [HEIGHT, WIDTH[kind], FRAMES] and len(config["image_sha256"][0]) == 64


def test_a_sweep_pairs_each_prompt_with_its_image(images):
    """Two prompts, each with its own image, two seeds (two batches of two on 4x2, one guided row per device, as
    test_sweep's): every video equals its own single run bit for bit, and one step program serves every batch."""
    gen = _generator(I2V, 4, 2)
    mesh = _mesh(4, 2)
    prompts, files = (PROMPT, "A dog runs"), [str(p) for p in images]
    request = pipeline.image_request(I2V, 2, files, None, (HEIGHT, WIDTH[I2V], FRAMES))
    base = pipeline.with_images(GenerationConfig(model_id=I2V, prompts=prompts, negative_prompt=NEGATIVE), request)
    settings = Stage2Settings(num_inference_steps=2, seeds=(SEED, SEED + 1), batch_size=2, dtype="float32",
                              **SAMPLING[I2V])
    cfg = pipeline.resolve_stage2(base, settings, mesh)
    gen.denoiser.programs.clear()
    latents = gen.run(cfg, progress=False)[2]
    assert len([name for name in gen.denoiser.programs if name.startswith("step")]) == 1
    for i, video in enumerate(pipeline.plan(cfg)):
        single = pipeline.with_images(GenerationConfig(model_id=I2V, prompts=(prompts[video.prompt_index],),
                                                       negative_prompt=NEGATIVE),
                                      pipeline.image_request(I2V, 1, [files[video.prompt_index]], None,
                                                             (HEIGHT, WIDTH[I2V], FRAMES)))
        one = pipeline.resolve_stage2(single, dataclasses.replace(settings, seeds=(video.seed,)), mesh)
        np.testing.assert_array_equal(gen.run(one, progress=False)[2][0], latents[i])


def test_our_kernel_on_image_to_video(references, images):
    """Our attention kernel (interpreted) for every attention call of the step, CLIP's image keys included, on 2x4."""
    gen = oneshot.Generator(I2V, _mesh(2, 4), text_dtype="float32", dtype="float32", attention="custom",
                            images=True)
    latents = gen.run(_config(I2V, _mesh(2, 4), images[0]), progress=False)[2]
    assert rel_err(latents, references[I2V][0]) <= LATENT_RTOL


def test_bf16_is_as_close_to_float32_as_diffusers_bf16(references, images):
    from conftest import BF16_MIN_SHARE, BF16_OVER_DIFFUSERS

    from tpu_wan.models.image_encoder import load_image

    pipe = _pipe(I2V)
    pipe.transformer.to(torch.bfloat16)
    pipe.text_encoder.to(torch.bfloat16)
    pipe.image_encoder.to(torch.bfloat16)  # the VAE stays float32, as ours
    pipe.scheduler = diffusers_scheduler("unipc", SAMPLING[I2V]["flow_shift"])
    with torch.no_grad():
        theirs = pipe(image=load_image(images[0]), prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT,
                      width=WIDTH[I2V], num_frames=FRAMES, num_inference_steps=STEPS, output_type="latent",
                      guidance_scale=SAMPLING[I2V]["guidance_scale"],
                      generator=torch.Generator("cpu").manual_seed(SEED)).frames.float().numpy()
    gen = oneshot.Generator(I2V, _mesh(1, 1), text_dtype="bfloat16", dtype="bfloat16", images=True)
    cfg = _config(I2V, _mesh(1, 1), images[0], dtype="bfloat16").replace(text_dtype="bfloat16")
    ours = gen.run(cfg, progress=False)[2]
    ref = references[I2V][0]
    ours_err, theirs_err = rel_err(ours, ref), rel_err(theirs, ref)
    print(f"I2V bf16 latents: ours {ours_err:.2e}, diffusers {theirs_err:.2e} ({ours_err / theirs_err:.2f}x)")
    assert BF16_MIN_SHARE * theirs_err <= ours_err <= BF16_OVER_DIFFUSERS * theirs_err
