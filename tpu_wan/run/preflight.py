"""Stage-to-stage consistency: what a stage checks of the previous stage's files, and of the model's config
files, before it imports or loads a model (seconds, where loading 14B takes minutes).

Each refusal names the file, what was expected and what was found, and which stage to rerun.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tpu_wan.core import artifacts
from tpu_wan.core import config as config_lib
from tpu_wan.core.config import ConfigError, GenerationConfig


def check_finite(array: np.ndarray, where: str, producer: str) -> None:
    if not np.isfinite(array.astype(np.float32)).all():
        bad = int(np.size(array) - np.isfinite(array.astype(np.float32)).sum())
        raise ConfigError(f"{where}: expected finite values, found {bad} NaN or Inf (rerun {producer})")


def check_embeddings_file(folder: Path, cfg: GenerationConfig, prompt_embeds, negative_embeds) -> None:
    """The stage-1 embeddings belong to this config: same model, one row per prompt, finite."""
    where = artifacts.EMBEDDINGS_FILE
    made_by = artifacts.read_metadata(Path(folder) / where).get("model_id")
    if made_by is not None and made_by != cfg.model_id:
        raise ConfigError(f"{where}: expected embeddings from {cfg.model_id!r} (generation_config.json), found "
                          f"{made_by!r} (rerun stage 1)")
    rows = (len(cfg.prompts), cfg.max_sequence_length)
    if prompt_embeds.shape[:2] != rows:
        raise ConfigError(f"{where}: expected {rows[0]} prompt(s) x {rows[1]} tokens as generation_config.json "
                          f"says, found {prompt_embeds.shape[0]} x {prompt_embeds.shape[1]} (rerun stage 1)")
    check_finite(prompt_embeds, where, "stage 1")
    check_finite(negative_embeds, where, "stage 1")


def check_text_dim(prompt_embeds: np.ndarray, cfg: GenerationConfig, text_dim: int) -> None:
    expected = (len(cfg.prompts), cfg.max_sequence_length, text_dim)
    if prompt_embeds.shape != expected:
        raise ConfigError(
            f"{artifacts.EMBEDDINGS_FILE}: expected shape {expected} (prompts, max_sequence_length, transformer "
            f"text_dim), found {prompt_embeds.shape} (rerun stage 1 with this model's text encoder)"
        )


def check_transformer_run(model_path: Path, cfg: GenerationConfig, mesh, prompt_embeds=None) -> dict:
    """A resolved stage-2 config against the transformer's config.json: tp divides the heads, the embeddings
    have its text dim, the attention settings trace at the run's shapes, and a fine-tuned checkpoint is
    readable (its names are checked against the model's as it loads). Returns that config.json."""
    from tpu_wan.models import checkpoints, finetune
    from tpu_wan.runtime import attention, parallelism
    from tpu_wan.runtime import mesh as mesh_lib

    if cfg.stage2.transformer_checkpoint is not None:
        finetune.read_checkpoint(cfg.stage2.transformer_checkpoint, cfg.stage2.checkpoint_key)  # lazy: headers only
    if cfg.stage2.loras or cfg.stage2.loras_2:
        from tpu_wan.models import lora

        # Read and matched here (and again as they fuse at load: seconds for a 14B LoRA) so that a key adapting no
        # weight is refused before any model loads.
        expected = checkpoints.expected_weights(checkpoints.empty_transformer(model_path), cfg.stage2.dtype)
        for expert, files in (("transformer", cfg.stage2.loras), ("transformer_2", cfg.stage2.loras_2)):
            if files:
                lora.fusions(files, expected, lora.FLAGS[expert])

    dit = checkpoints.read_config(model_path, "transformer", required=(
        "num_attention_heads", "attention_head_dim", "text_dim", "in_channels", "patch_size"))
    if cfg.stage2.sharding_mode == "megatron":  # sequence sharding takes any head count (parallelism.sequence_attention)
        mesh_lib.check_heads(mesh, dit["num_attention_heads"],
                             "transformer in --sharding megatron (--sharding sequence takes any head count)")
    if prompt_embeds is not None:
        check_text_dim(prompt_embeds, cfg, dit["text_dim"])
    shape = cfg.stage2.latent_shape(cfg.stage2.batch_size, config_lib.latent_channels(dit))
    tokens = config_lib.video_tokens(shape, dit["patch_size"])
    layout = parallelism.Layout(cfg.stage2.sharding_mode, mesh)
    attention.check_calls(
        attention.make_attention(cfg.stage2.attention, mesh, layout=layout),
        batch=cfg.stage2.batch_size * (2 if cfg.do_classifier_free_guidance else 1),
        heads=dit["num_attention_heads"], head_dim=dit["attention_head_dim"], tokens=tokens,
        text_len=cfg.max_sequence_length, dtype=cfg.stage2.dtype, mesh=mesh,
    )
    return dit


def check_stage2_run(model_path: Path, cfg: GenerationConfig, mesh, prompt_embeds=None) -> dict:
    """Everything a stage-2 run (staged or in one process) is refused for before a model loads:
    check_transformer_run, and --init_latents readable with one row of the right shape per video. Returns the
    transformer's config.json."""
    from tpu_wan.core.batch import plan_videos
    from tpu_wan.run import sweep

    dit = check_transformer_run(model_path, cfg, mesh, prompt_embeds)
    if cfg.stage2.init_latents is not None:
        videos = plan_videos(cfg.prompts, cfg.stage2.seeds)
        shape = cfg.stage2.latent_shape(1, config_lib.latent_channels(dit))[1:]
        sweep.starting_latents(cfg, videos[:1], videos, shape)
    return dit


def check_image_tensors(model_path: Path, cfg: GenerationConfig, image: dict) -> None:
    """Stage 1's image tensors are what this image-to-video run takes: present exactly where the config has images,
    CLIP embeddings exactly where the model has an image encoder, conditioning latents of the video's latent grid
    (all its frames for the I2V models' mask and latents; the first for TI2V), finite."""
    from tpu_wan.models import checkpoints
    from tpu_wan.models.kinds import MASK_CHANNELS

    where = artifacts.EMBEDDINGS_FILE
    kind = checkpoints.model_kind(model_path)
    want = set() if cfg.images is None else {"image_condition", *(("image_embeds",) if kind.image_encoder else ())}
    if set(image) != want:
        raise ConfigError(f"{where}: expected image tensors {sorted(want)} for {cfg.model_id} "
                          f"({'an image' if cfg.images else 'no image'} in generation_config.json), found "
                          f"{sorted(image)} (rerun stage 1)")
    if not image:
        return
    z = kind.z_dim
    _, _, f, h, w = cfg.stage2.latent_shape(1, z)
    expected = (len(cfg.prompts), z, 1, h, w) if kind.expand_timesteps else (
        len(cfg.prompts), MASK_CHANNELS + z, f, h, w)
    if image["image_condition"].shape != expected:
        raise ConfigError(f"{where}: expected image_condition of shape {expected} for {cfg.stage2.video_size}, found "
                          f"{image['image_condition'].shape} (rerun stage 1)")
    for key, value in image.items():
        check_finite(value, f"{where} {key}", "stage 1")


def check_latents(latents: np.ndarray, cfg: GenerationConfig, path: Path) -> None:
    """Stage-2 latents match the config's video size and are finite."""
    expected = cfg.stage2.latent_shape(1, latents.shape[1])
    if latents.shape != expected:
        raise ConfigError(f"{Path(path).name}: expected shape {expected} for {cfg.stage2.video_size} "
                          f"(generation_config.json), found {latents.shape} (rerun stage 2)")
    check_finite(latents, Path(path).name, "stage 2")
