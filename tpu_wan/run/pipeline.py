"""The three stages as library calls: run_stage1 / run_stage2 / run_stage3 read and write the artifact folder
(formats in tpu_wan.core.artifacts), through the encode / denoise / decode calls that tpu_wan.run.oneshot
(generate_flax.py) uses in memory, so the staged and the one-process paths compute the same numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tpu_wan.core import artifacts
from tpu_wan.core import config as config_lib
from tpu_wan.core.config import AttentionOptions, ConfigError, GenerationConfig, Stage2Settings
from tpu_wan.models import checkpoints
from tpu_wan.run import preflight, sweep
from tpu_wan.runtime import distributed, profiling
from tpu_wan.runtime.mesh import check_heads, make_mesh
from tpu_wan.runtime.mesh import platform as mesh_platform
from tpu_wan.runtime.profiling import Recorder

log = logging.getLogger("tpu_wan")


def resolve_stage2(cfg: GenerationConfig, asked: Stage2Settings, mesh) -> GenerationConfig:
    """The config with every stage-2 setting decided: the model preset, defaults for this size and platform, the
    mesh, the sharding mode and (Wan 2.2) the experts' guidance, boundary and steps filled in where `asked` leaves
    them None (a distill solver's own defaults first: config.solver_defaults). Refuses settings the model does not
    take."""
    folder = checkpoints.config_folder(cfg.model_id)
    kind = checkpoints.model_kind(folder)
    preset = config_lib.preset_for(cfg.model_id, kind.family)
    asked = image_size(cfg, kind, asked)
    asked = config_lib.solver_defaults(asked)  # a distill solver's steps, guidance and shift before the preset's
    s = dataclasses.replace(asked, **{
        f: getattr(preset, f) for f in ("height", "width", "frames", "num_inference_steps", "guidance_scale")
        if getattr(asked, f) is None
    })
    check_model_settings(cfg.model_id, kind, asked, s)
    from tpu_wan.core.batch import default_batch_size

    s = dataclasses.replace(
        s,
        seeds=s.seeds or (config_lib.DEFAULT_SEED,),
        batch_size=s.batch_size or default_batch_size(mesh.shape["dp"], s.guidance_scale > 1.0),
        flow_shift=_first_set(s.flow_shift, preset.flow_shift, config_lib.default_flow_shift(s.height, s.width)),
        sample_solver=s.sample_solver or config_lib.DEFAULT_SOLVER,
        dtype=s.dtype or config_lib.default_dtype(mesh_platform(mesh)),
        mesh=(mesh.shape["dp"], mesh.shape["tp"]),
        attention=s.attention or AttentionOptions(),
        expand_timesteps=True if kind.expand_timesteps else None,
        vae=None if kind.vae == "wan2.1" else kind.vae,
    )
    if len(kind.experts) > 1:
        # as diffusers: the low-noise expert's guidance is the high-noise one's unless given; the preset's pair
        # applies when neither is given
        guidance_2 = _first_set(asked.guidance_scale_2, None if asked.guidance_scale is not None else
                                preset.guidance_scale_2, s.guidance_scale)
        ratio = _first_set(asked.boundary_ratio, kind.boundary_ratio)
        from tpu_wan.sampling import schedulers

        train_steps = checkpoints.read_config(folder, "scheduler").get("num_train_timesteps", 1000)
        timesteps = schedulers.make_schedule(s.sample_solver, s.num_inference_steps, s.flow_shift,
                                             denoising_steps=s.denoising_steps).timesteps
        steps = schedulers.expert_steps(timesteps, ratio * train_steps, kind.experts)
        s = dataclasses.replace(s, guidance_scale_2=guidance_2, boundary_ratio=ratio, expert_steps=steps)
    from tpu_wan.sampling import step_cache

    s = dataclasses.replace(s, cache=step_cache.check(s.cache, s.sample_solver, kind.experts))  # canonical text
    from tpu_wan.models import lora

    s = dataclasses.replace(s, loras=lora.checked(s.loras, "--lora"), loras_2=lora.checked(s.loras_2, "--lora_2"))
    sharding = resolve_sharding(cfg.model_id, cfg.max_sequence_length, s, mesh)
    return cfg.replace(stage2=dataclasses.replace(s, sharding=sharding))


def image_size(cfg: GenerationConfig, kind, asked: Stage2Settings) -> Stage2Settings:
    """`asked` with the size stage 1 encoded the image at (image to video); refuses another size, and an
    image-to-video model whose stage 1 had no image."""
    if cfg.image_size is None:
        if kind.needs_image:
            raise ConfigError(f"generation_config.json: expected an image for {cfg.model_id} (an image-to-video "
                              f"model), found none (rerun stage 1 with --image)")
        return asked
    height, width, frames = cfg.image_size
    for flag, name, value in (("--height", "height", height), ("--width", "width", width),
                              ("--frames", "frames", frames)):
        given = getattr(asked, name)
        if given is not None and given != value:
            raise ConfigError(f"{flag}: expected the size stage 1 encoded the image at ({width}x{height}x{frames}), "
                              f"found {given} (rerun stage 1 with {flag} {given})")
    return dataclasses.replace(asked, height=height, width=width, frames=frames)


def model_preset(model_id: str) -> config_lib.ModelPreset:
    """The defaults of `model_id`: its own preset, else its family's (decided from its config files)."""
    return config_lib.preset_for(model_id, checkpoints.model_kind(checkpoints.config_folder(model_id)).family)


def _first_set(*values):
    return next(v for v in values if v is not None)


def check_model_settings(model_id: str, kind, asked: Stage2Settings, s: Stage2Settings) -> None:
    """Refuses a setting `model_id` (of ModelKind `kind`) does not take: the experts' flags on a one-transformer
    model, a size off its stride. `s`: `asked` with the preset's size filled in."""
    if len(kind.experts) == 1:
        given = [flag for flag, value in (("--guidance_scale_2", asked.guidance_scale_2),
                                          ("--boundary_ratio", asked.boundary_ratio), ("--lora_2", asked.loras_2))
                 if value is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)}: expected a two-expert model (model_index.json with "
                              f"transformer_2 and boundary_ratio, as Wan 2.2 T2V-A14B), found {model_id} with one "
                              f"transformer")
    multiple = kind.size_multiple
    for flag, value in (("--height", s.height), ("--width", s.width)):
        if value % multiple:
            raise ConfigError(f"{flag} must be a multiple of {multiple} for {model_id} (its VAE compresses "
                              f"{kind.vae_spatial}x and its transformer patches 2x2), found {value}")


def resolve_sharding(model_id: str, text_tokens: int, s: Stage2Settings, mesh) -> str:
    """s.sharding, or for 'auto' (None) the mode that moves fewer bytes per step at this model, size and mesh.
    `s`: settings with the size, guidance, batch size and dtype decided."""
    if s.sharding not in (None, "auto"):
        return s.sharding
    if mesh.size == 1:
        return "megatron"  # nothing is split: the modes are one program
    from tpu_wan.runtime import parallelism

    dit = checkpoints.read_config(checkpoints.config_folder(model_id), "transformer", required=(
        "num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers", "in_channels", "out_channels",
        "patch_size"))
    shape = s.latent_shape(s.batch_size, config_lib.latent_channels(dit))
    tokens = config_lib.video_tokens(shape, dit["patch_size"])
    guided = s.guidance_scale > 1.0
    rows = s.batch_size * (2 if guided else 1)
    return parallelism.choose(dit, rows, tokens, text_tokens, mesh, jnp.dtype(s.dtype).itemsize, guided)


# The building blocks both runners share (run_stage1/2/3 here, tpu_wan.run.oneshot's Generator): each model loaded
# onto the mesh, and its work (encode, denoise, the VAE's decode).


def _log_loading(what: str, model_path, mesh, dtype) -> None:
    log.info("loading the %s of %s (%s) on a dp=%d x tp=%d mesh", what, Path(model_path).name, dtype,
             mesh.shape["dp"], mesh.shape["tp"])


def load_encoder(model_path, mesh, dtype):
    """UMT5 (stage 1) on `mesh`."""
    from tpu_wan.models.text_encoder import TextEncoder

    _log_loading("text encoder", model_path, mesh, dtype)
    return TextEncoder(model_path, mesh, dtype)


def load_denoiser(model_path, mesh, dtype, attention, *, expert_offload: bool = False, **finetune):
    """The Wan DiT (stage 2; both experts of a two-expert model) on `mesh`; `finetune`: finetune_settings'
    keywords; `expert_offload`: the idle expert in host memory."""
    from tpu_wan.models.transformer import Denoiser

    _log_loading("transformer", model_path, mesh, dtype)
    return Denoiser(model_path, mesh, dtype, attention, expert_offload=expert_offload, **finetune)


def check_offload(cfg: GenerationConfig, expert_offload: bool) -> None:
    """--expert_offload acts on two-expert models only."""
    if expert_offload and cfg.stage2.expert_steps is None:
        raise ConfigError(f"--expert_offload: expected a two-expert model (as Wan 2.2 T2V-A14B), found {cfg.model_id} "
                          f"with one transformer")


def finetune_settings(cfg: GenerationConfig, non_strict: bool) -> dict:
    """load_denoiser's fine-tuned weight keywords for `cfg`: the fine-tuned checkpoint and each expert's LoRAs."""
    return dict(transformer_checkpoint=cfg.stage2.transformer_checkpoint, checkpoint_key=cfg.stage2.checkpoint_key,
                non_strict=non_strict, loras={"transformer": cfg.stage2.loras, "transformer_2": cfg.stage2.loras_2})


def load_decoder(model_path, mesh, dtype: str = "float32", conv: str = "auto"):
    """The Wan VAE decoder (stage 3) on `mesh`; `conv`: its convolutions (tpu_wan.models.vae_conv)."""
    from tpu_wan.models.vae import VaeDecoder

    _log_loading("VAE decoder", model_path, mesh, dtype)
    return VaeDecoder(model_path, mesh, dtype, conv=conv)


def encode(encoder, cfg: GenerationConfig) -> tuple[np.ndarray, np.ndarray]:
    from tpu_wan.models.text_encoder import encode_prompts

    return encode_prompts(encoder, cfg.prompts, cfg.negative_prompt, cfg.max_sequence_length)


def plan(cfg: GenerationConfig):
    from tpu_wan.core.batch import plan_videos

    return plan_videos(cfg.prompts, cfg.stage2.seeds)


def denoise(denoiser, cfg: GenerationConfig, prompt_embeds, negative_prompt_embeds, *, num_steps=None, progress=True,
            image: dict | None = None):
    """Latents [V, C, F, H, W] of every (prompt, seed) video of `cfg`, in plan order, kept in memory; `image`: stage
    1's image tensors (image to video)."""
    preflight.check_text_dim(prompt_embeds, cfg, denoiser.config.text_dim)
    videos = plan(cfg)
    out = []
    sweep.denoise_videos(
        denoiser, cfg, prompt_embeds, negative_prompt_embeds, videos, videos,
        lambda group, latents: out.append(latents), num_steps=num_steps, progress=progress, image=image,
    )
    return np.concatenate(out)


def run_stage1(
    model_id: str,
    prompts: list[str],
    negative_prompt: str,
    output_dir: str | Path,
    *,
    max_sequence_length: int = 512,
    dtype: str | None = None,
    dp: int | None = None,
    tp: int | None = None,
    images: list[str] | None = None,
    last_images: list[str] | None = None,
    size: tuple[int | None, int | None, int | None] = (None, None, None),
) -> StageRun:
    """Encodes the prompts (and for image to video each prompt's image: `images`, `last_images`, one path per
    prompt, at `size` = (height, width, frames), None: the model's); writes stage1_embeddings.safetensors,
    generation_config.json and metrics.json."""
    start, rec = time.perf_counter(), Recorder()
    dtype = dtype or config_lib.default_dtype(jax.default_backend())
    request = image_request(model_id, len(prompts), images, last_images, size)
    cfg = GenerationConfig(
        model_id=model_id, prompts=tuple(prompts), negative_prompt=negative_prompt,
        max_sequence_length=max_sequence_length, text_dtype=dtype,
    )
    mesh = make_mesh(dp, tp)
    model_path = checkpoints.resolve_model(model_id)
    cfg = cfg.replace(fps=model_preset(model_id).fps)  # stage 3's default frame rate: the model's
    # before transformers is imported and the encoder loaded
    check_heads(mesh, checkpoints.read_config(model_path, "text_encoder", ("num_heads",))["num_heads"], "text encoder")
    pictures = {}
    if request is not None:
        from tpu_wan.models import image_encoder

        with rec.section("text_encoder", "io"):
            pictures = image_encoder.read_images(request)  # every file read before any model loads
        cfg = with_images(cfg, request)
    with rec.section("text_encoder", "load"):
        encoder = load_encoder(model_path, mesh, dtype)
    with rec.section("text_encoder", "run"):
        prompt_embeds, negative_embeds = encode(encoder, cfg)
    tensors, conditioner = {}, None
    if request is not None:
        conditioner = load_image_conditioner(model_path, mesh, dtype, rec)
        tensors = conditioner.encode(request, pictures)
    with rec.section("text_encoder", "io"):
        artifacts.save_embeddings(output_dir, prompt_embeds, negative_embeds, metadata={"model_id": model_id},
                                  image=tensors)
        artifacts.save_config(output_dir, cfg.to_json_dict())
    add_stage1_models(rec, encoder, conditioner)
    return StageRun(cfg, profiling.save_stage_metrics(output_dir, rec, "text_encoder", cfg.to_json_dict(), mesh, start))


def image_request(model_id: str, num_prompts: int, images: list[str] | None, last_images: list[str] | None,
                  size: tuple[int | None, int | None, int | None]):
    """The image-to-video request of a stage-1 run (image_encoder.ImageRequest; None for text to video), its size
    filled from the model's preset, checked against the model before anything loads."""
    from tpu_wan.models import image_encoder

    kind = checkpoints.model_kind(checkpoints.config_folder(model_id))
    given = [flag for flag, value in zip(("--height", "--width", "--frames"), size) if value is not None]
    if images is None:
        if last_images:
            raise ConfigError("--last_image: expected --image with it, found none")
        if given and not kind.needs_image:
            raise ConfigError(f"{' and '.join(given)} on stage 1: expected --image with it (stage 1 encodes the image "
                              "at the video's size; text-to-video sizes are stage 2's flags)")
        image_encoder.check_request(model_id, kind, None)
        return None
    for flag, paths in (("--image_file", images), ("--last_image", last_images)):
        if paths is not None and len(paths) != num_prompts:
            raise ConfigError(f"{flag}: expected one image per prompt ({num_prompts}), found {len(paths)}")
    preset = model_preset(model_id)
    height, width, frames = (p if v is None else v for v, p in zip(size, (preset.height, preset.width, preset.frames)))
    request = image_encoder.ImageRequest(tuple(map(str, images)), None if last_images is None else
                                         tuple(map(str, last_images)), height, width, frames)
    image_encoder.check_request(model_id, kind, request)
    return request


def with_images(cfg: GenerationConfig, request) -> GenerationConfig:
    """`cfg` recording the request: each image's path and sha256, and the size stage 2 generates."""
    from tpu_wan.models.image_encoder import file_sha256

    lasts = request.last_images
    return cfg.replace(images=request.images, image_sha256=tuple(map(file_sha256, request.images)),
                       last_images=lasts, last_image_sha256=None if lasts is None else tuple(map(file_sha256, lasts)),
                       image_size=(request.height, request.width, request.frames))


def load_image_conditioner(model_path, mesh, dtype: str, rec: Recorder):
    """The image models (image_encoder.ImageConditioner) of an image-to-video run, timed as stage 1's."""
    from tpu_wan.models.image_encoder import ImageConditioner

    _log_loading("image encoders", model_path, mesh, dtype)
    return ImageConditioner(model_path, checkpoints.model_kind(model_path), mesh, dtype,
                            timed=lambda part: rec.section("text_encoder", part))


def add_stage1_models(rec: Recorder, encoder, conditioner=None) -> None:
    """Stage 1's metrics over every model it ran: UMT5, and for image to video CLIP and the VAE encoder
    (image_encoder.ImageConditioner)."""
    if conditioner is None:
        rec.add_model("text_encoder", encoder.weights, encoder.programs, encoder.compile_s)
        return
    programs, compile_s = dict(encoder.programs), dict(encoder.compile_s)
    for m in conditioner.models.values():
        programs.update(m.programs)
        compile_s.update(m.compile_s)
    rec.add_model("text_encoder", {"text_encoder": encoder.weights, **conditioner.weights}, programs, compile_s)


def run_stage2(
    input_dir: str | Path,
    settings: Stage2Settings,
    *,
    output_dir: str | Path | None = None,
    dp: int | None = None,
    tp: int | None = None,
    warmup_steps: int = 0,
    overwrite: bool = False,
    non_strict: bool = False,
    expert_offload: bool = False,
) -> StageRun:
    """Denoises every (prompt, seed) video from the stage-1 embeddings, saving each batch as it lands.

    One video: stage2_latents.safetensors; several: stage2_latents/<name>.safetensors. Videos already in
    `output_dir` from the same settings are skipped (a rerun resumes), unless `overwrite`. `non_strict`: apply
    the fine-tuned weights that fit (tpu_wan.models.finetune). `expert_offload`: two experts, the idle one in host
    memory (the swaps timed in metrics.json)."""
    start, rec = time.perf_counter(), Recorder()
    output_dir = Path(output_dir or input_dir)
    with rec.section("transformer", "io"):
        cfg = GenerationConfig.from_json_dict(artifacts.load_config(input_dir))
        prompt_embeds, negative_embeds = artifacts.load_embeddings(input_dir)
        image = artifacts.load_image_tensors(input_dir)
    preflight.check_embeddings_file(input_dir, cfg, prompt_embeds, negative_embeds)
    mesh = make_mesh(dp, tp)
    cfg = resolve_stage2(cfg, settings, mesh)
    check_offload(cfg, expert_offload)
    videos = plan(cfg)
    todo = sweep.pending(output_dir, cfg, videos, overwrite)
    if not todo:
        log.info("all %d videos already in %s (--overwrite to redo)", len(videos), output_dir)
        return StageRun(cfg, None)
    model_path = checkpoints.resolve_model(cfg.model_id)
    preflight.check_stage2_run(model_path, cfg, mesh, prompt_embeds)  # refused before anything is written
    preflight.check_image_tensors(model_path, cfg, image)
    with rec.section("transformer", "load"):
        denoiser = load_denoiser(model_path, mesh, cfg.stage2.dtype, cfg.stage2.attention,
                                 expert_offload=expert_offload, **finetune_settings(cfg, non_strict))
    with rec.section("transformer", "io"):
        if overwrite:  # only now, after every check passed: a refused run leaves the previous results alone
            sweep.clear_previous(output_dir)
        artifacts.save_config(output_dir, cfg.to_json_dict())  # first, so a crashed sweep can be resumed
    if warmup_steps:
        with rec.section("transformer", "warmup"):
            sweep.denoise_videos(denoiser, cfg, prompt_embeds, negative_embeds, todo[:1], videos,
                                 lambda *_: None, num_steps=warmup_steps, progress=False, image=image)

    def save(group, latents):
        with rec.section("transformer", "io"):
            for video, row in zip(group, latents):
                path = sweep.latents_path(output_dir, video, single=len(videos) == 1)
                artifacts.save_latents(path, row[None], metadata=sweep.video_metadata(cfg, video))

    denoiser.step_seconds.clear()
    denoiser.cache_log.clear()
    with rec.section("transformer", "run"):
        sweep.denoise_videos(denoiser, cfg, prompt_embeds, negative_embeds, todo, videos, save, image=image)
    rec.add_steps("transformer", denoiser.step_seconds, len(denoiser.step_seconds))
    rec.add_cache("transformer", denoiser.cache_log)
    rec.add_swaps("transformer", denoiser.swap_seconds)
    rec.add_model("transformer", denoiser.weights, denoiser.programs, denoiser.compile_s)
    return StageRun(cfg, profiling.save_stage_metrics(output_dir, rec, "transformer", cfg.to_json_dict(), mesh, start))


def run_stage3(
    input_dir: str | Path,
    *,
    output_video: str | Path | None = None,
    output_dir: str | Path | None = None,
    fps: int | None = None,
    save_frames: bool = False,
    vae_dtype: str = "float32",
    vae_conv: str = "auto",
    dp: int | None = None,
    tp: int | None = None,
    preview: bool = False,
) -> StageRun:
    """Decodes the stage-2 latents: one video -> `output_video` (default <input_dir>/output_video.mp4);
    several -> <output_dir>/<prompt-slug>_seed<seed>.mp4 each. `save_frames` also writes the float frames,
    `preview` a contact sheet <video>.png beside each video."""
    start, rec = time.perf_counter(), Recorder()
    input_dir = Path(input_dir)
    cfg = GenerationConfig.from_json_dict(artifacts.load_config(input_dir))
    cfg = cfg.replace(fps=cfg.fps if fps is None else fps, vae_dtype=vae_dtype)
    videos = plan(cfg) if cfg.stage2 else []
    # one video: --output_video, else the stage folder's output_video.mp4; several: --output_dir, else the stage folder
    destinations = video_paths(cfg, output_video, (output_dir or input_dir) if len(videos) > 1 else input_dir)
    if len(videos) > 1:
        sources = [(artifacts.video_latents_path(input_dir, v.name), dst) for v, dst in zip(videos, destinations)]
    else:
        sources = [(input_dir / artifacts.LATENTS_FILE, destinations[0])]
    with rec.section("vae", "io"):
        latents = [artifacts.load_latents(src) for src, _ in sources]  # all present before any decoding
    for x, (src, _) in zip(latents, sources):
        preflight.check_latents(x, cfg, src)
    mesh = make_mesh(dp, tp)
    with rec.section("vae", "load"):
        decoder = load_decoder(checkpoints.resolve_model(cfg.model_id), mesh, vae_dtype, vae_conv)
    for x, (src, _) in zip(latents, sources):  # all of them before the first video is written
        if x.shape[1] != decoder.config.z_dim:
            raise ConfigError(f"{src.name}: expected {decoder.config.z_dim} latent channels for the VAE of "
                              f"{cfg.model_id}, found {x.shape[1]} (rerun stage 2)")
    from tpu_wan.core import preview as preview_lib
    from tpu_wan.core import video

    paths, float_frames = [], []
    with rec.section("vae", "run"):
        for x, (_, dst) in zip(distributed.progress(latents, show=len(latents) > 1, desc="decoding", unit="video"), sources):
            # Without --save_frames only the mp4 needs them: converted to uint8 on device, a quarter of the
            # transfer.
            frames = decoder.decode(x, uint8=not save_frames)
            with rec.section("vae", "io"):
                if save_frames:
                    float_frames.append(frames)
                paths.append(video.write_video(dst, frames[0], cfg.fps))
                if preview:
                    preview_lib.write_preview(preview_lib.preview_path(dst), video.to_uint8(frames[0]))
    with rec.section("vae", "io"):
        if save_frames:
            artifacts.save_frames(input_dir, np.concatenate(float_frames))
        artifacts.save_config(input_dir, cfg.to_json_dict())
    rec.add_model("vae", decoder.params, decoder.programs, decoder.compile_s)
    return StageRun(cfg, profiling.save_stage_metrics(input_dir, rec, "vae", cfg.to_json_dict(), mesh, start), paths)


@dataclasses.dataclass
class StageRun:
    config: GenerationConfig
    metrics: dict | None  # what the stage added to <folder>/metrics.json; None when it had nothing to do
    videos: list[Path] | None = None  # stage 3


def video_paths(cfg: GenerationConfig, output_video: str | Path | None, output_dir: str | Path | None) -> list[Path]:
    """Where each video of `cfg` goes: `output_video` (else <output_dir>/output_video.mp4) for a single one,
    <output_dir>/<name>.mp4 for several; the output dir defaults to the current one."""
    videos = plan(cfg) if cfg.stage2 else []
    if len(videos) <= 1:
        return [Path(output_video or Path(output_dir or ".") / artifacts.VIDEO_FILE)]
    if output_video is not None:
        raise ConfigError(f"--output_video: expected one video, found {len(videos)}: use --output_dir")
    return [Path(output_dir or ".") / f"{v.name}.mp4" for v in videos]
