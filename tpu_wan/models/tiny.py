"""Tiny random Wan checkpoints, built offline and deterministically, one per model family.

    python -m tpu_wan.models.tiny [--model_id tiny-random-a14b] [--output DIR]

writes a diffusers folder (model_index.json, tokenizer, text_encoder, transformer, vae, scheduler) that
`diffusers.WanPipeline.from_pretrained` loads. Every architectural feature of the real model is present
(UMT5 relative attention, DiT with RoPE and qk RMS norm, causal 3D VAE with temporal upsampling); only the
widths and depths are small. The demo and the tests run on them; `--model_id` resolves each id in TINY_MODELS:
  tiny-random        Wan 2.1 text-to-video (one transformer, the z16 VAE)
  tiny-random-a14b   Wan 2.2 T2V-A14B's layout: a high-noise `transformer` and a low-noise `transformer_2`
                     switched at `boundary_ratio`
  tiny-random-ti2v   Wan 2.2 TI2V-5B's layout: one timestep per token (`expand_timesteps`) over the z48 VAE
                     (residual up blocks, 2x2 pixel patches, 16x spatial compression); text or image to video
  tiny-random-i2v    Wan 2.1 I2V-14B's layout (WanImageToVideoPipeline): a CLIP vision encoder whose image
                     embeddings join cross-attention, the first frame's latents and mask as 20 more input channels
  tiny-random-i2v-a14b  Wan 2.2 I2V-A14B's layout: two experts (boundary 0.9) over those 36 channels, no CLIP
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_ID = "tiny-random"
TINY_A14B_ID = "tiny-random-a14b"
TINY_TI2V_ID = "tiny-random-ti2v"
TINY_I2V_ID = "tiny-random-i2v"
TINY_I2V_A14B_ID = "tiny-random-i2v-a14b"
TINY_MODELS = (TINY_MODEL_ID, TINY_A14B_ID, TINY_TI2V_ID, TINY_I2V_ID, TINY_I2V_A14B_ID)
# Bump when the architecture or the builder changes, so stale caches are rebuilt, not reused.
TINY_VERSION = 1
TINY_SEED = 0

TEXT_DIM = 32  # UMT5 d_model == transformer text_dim
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,  # divisible by tp=4 so the 2x4 test mesh shards heads
    attention_head_dim=16,  # RoPE splits D into t/h/w parts: 8/4/4
    in_channels=16,
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=32,
    ffn_dim=128,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
VAE_CONFIG = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)
# Wan 2.2 TI2V-5B's VAE (z_dim 48, residual up blocks, patch_size 2: 16x spatial), narrow and shallow. Its
# latent statistics are the published model's (48 of them).
TI2V_VAE_CONFIG = dict(
    base_dim=8,
    decoder_base_dim=12,
    z_dim=48,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
)
TI2V_TRANSFORMER_CONFIG = dict(in_channels=48, out_channels=48)
# Image to video: noise (16), frame mask (4) and first-frame latents (16) in; Wan 2.1's also takes CLIP's image
# embeddings (image_dim = the vision model's width) through its own key/value projections (the DiT's width).
I2V_TRANSFORMER_CONFIG = dict(in_channels=36, out_channels=16)
CLIP_DIM = 32
I2V_CLIP_TRANSFORMER_CONFIG = dict(image_dim=CLIP_DIM, added_kv_proj_dim=64)
# CLIP ViT-H/14's layout (pre-norm layers, class token, penultimate layer's states used), narrow: 32 x 32 images
# in 8 x 8 patches, 17 tokens.
CLIP_VISION_CONFIG = dict(hidden_size=CLIP_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5)
CLIP_PROCESSOR_CONFIG = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
I2V_A14B_BOUNDARY_RATIO = 0.9  # Wan 2.2 I2V-A14B's
# Wan 2.2 A14B switches experts at t = 875 of 1000; the tiny model's does too, which its preset's steps and
# shift cross (tests pick steps that run both experts).
A14B_BOUNDARY_RATIO = 0.875
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
)
# A small multilingual corpus: enough for sentencepiece to learn a few hundred pieces covering ASCII
# letters, digits, punctuation and some CJK characters, so any prompt tokenises without surprises.
_CORPUS = """\
A cat playing piano in a jazz club, cinematic lighting, slow camera pan.
A robot dancing on a rooftop at sunset, neon city in the background.
Two dogs run across a snowy field; the camera follows them at ground level.
A cup of coffee steams on a wooden table next to an open book.
Waves crash against black rocks under a stormy sky, 4k, highly detailed.
An astronaut rides a horse through a desert of red sand.
Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality.
JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, deformed.
The quick brown fox jumps over the lazy dog 0123456789 times!
一只猫在爵士俱乐部里弹钢琴，电影感灯光。
色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止。
机器人在屋顶上跳舞，夕阳西下。
"""
_SPM_VOCAB_SIZE = 192


def default_cache_dir(model_id: str = TINY_MODEL_ID) -> Path:
    """Where the tiny model `model_id` is built: $TPU_WAN_CACHE, else ~/.cache/tpu_wan."""
    from tpu_wan.core.config import cache_root

    return cache_root() / f"{model_id}-v{TINY_VERSION}"


def _wan22_vae_statistics() -> dict:
    """The published TI2V-5B VAE's latents_mean and latents_std (48 channels each), from the packaged config."""
    import json

    config = Path(__file__).resolve().parent / "model_configs" / "Wan2.2-TI2V-5B-Diffusers" / "vae" / "config.json"
    data = json.loads(config.read_text(encoding="utf-8"))
    return {key: data[key] for key in ("latents_mean", "latents_std")}


def _train_tokenizer(work: Path):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from transformers import T5Tokenizer

    corpus = work / "corpus.txt"
    # Repeat the corpus so every piece has enough counts for the unigram EM to be stable.
    corpus.write_text(_CORPUS * 20, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(work / "spm"),
        vocab_size=_SPM_VOCAB_SIZE,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,  # T5's special-token ids
        num_threads=1,  # multi-threaded EM is not bit-reproducible
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((work / "spm.model").read_bytes())
    vocab = [(p.piece, p.score) for p in proto.pieces]
    return T5Tokenizer(
        vocab=vocab,
        extra_ids=0,
        _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
        model_max_length=512,
    )


TEXT_ENCODER_CONFIG = dict(
    d_model=TEXT_DIM,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
)


def build_tiny_checkpoint(output_dir: str | Path, *, model_id: str = TINY_MODEL_ID,
                          text_encoder_config: dict | None = None, transformer_config: dict | None = None,
                          vae_config: dict | None = None) -> Path:
    """Builds the tiny checkpoint of family `model_id` (TINY_MODELS) into `output_dir` (created atomically) and
    returns it. The config dicts override fields of the tiny ones (benchmarks build larger random models this
    way)."""
    if model_id not in TINY_MODELS:
        raise ValueError(f"expected a tiny model id in {TINY_MODELS}, found {model_id!r}")
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=output_dir.parent))
    try:
        tokenizer = _train_tokenizer(staging)
        torch.manual_seed(TINY_SEED)
        text_config = {**TEXT_ENCODER_CONFIG, **(text_encoder_config or {})}
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **text_config)).eval()
        ti2v = model_id == TINY_TI2V_ID
        i2v = model_id in (TINY_I2V_ID, TINY_I2V_A14B_ID)
        family_dit = TI2V_TRANSFORMER_CONFIG if ti2v else I2V_TRANSFORMER_CONFIG if i2v else {}
        if model_id == TINY_I2V_ID:
            family_dit = {**family_dit, **I2V_CLIP_TRANSFORMER_CONFIG}
        dit_config = {**TRANSFORMER_CONFIG, **family_dit, **(transformer_config or {})}
        torch.manual_seed(TINY_SEED + 1)
        transformer = WanTransformer3DModel(**dit_config).eval()
        torch.manual_seed(TINY_SEED + 2)
        base_vae = {**TI2V_VAE_CONFIG, **_wan22_vae_statistics()} if ti2v else VAE_CONFIG
        vae = AutoencoderKLWan(**{**base_vae, **(vae_config or {})}).eval()
        scheduler = UniPCMultistepScheduler(**SCHEDULER_CONFIG)
        family = {}
        if model_id in (TINY_A14B_ID, TINY_I2V_A14B_ID):
            torch.manual_seed(TINY_SEED + 3)  # the low-noise expert: same config, its own weights
            ratio = A14B_BOUNDARY_RATIO if model_id == TINY_A14B_ID else I2V_A14B_BOUNDARY_RATIO
            family = dict(transformer_2=WanTransformer3DModel(**dit_config).eval(), boundary_ratio=ratio)
        elif ti2v:
            family = dict(expand_timesteps=True)
        elif model_id == TINY_I2V_ID:
            from transformers import (
                CLIPImageProcessor,
                CLIPVisionConfig,
                CLIPVisionModel,
            )

            torch.manual_seed(TINY_SEED + 4)
            family = dict(image_encoder=CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION_CONFIG)).eval(),
                          image_processor=CLIPImageProcessor(**CLIP_PROCESSOR_CONFIG))
        pipe = (WanImageToVideoPipeline if i2v else WanPipeline)(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
            **family,
        )
        for name in ("corpus.txt", "spm.model", "spm.vocab"):
            (staging / name).unlink()
        pipe.save_pretrained(staging, safe_serialization=True)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def ensure_tiny_checkpoint(cache_dir: str | Path | None = None, model_id: str = TINY_MODEL_ID) -> Path:
    """Returns the folder of tiny model `model_id`, building it on first use (once, even with concurrent
    callers)."""
    from filelock import FileLock

    path = Path(cache_dir) if cache_dir else default_cache_dir(model_id)
    if (path / "model_index.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / "model_index.json").is_file():
            build_tiny_checkpoint(path, model_id=model_id)
    return path


def checkpoint_digest(path: str | Path) -> str:
    """sha256 over every file's relative path and bytes: equal digests mean identical checkpoints."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_id", default=TINY_MODEL_ID, choices=TINY_MODELS, help="which tiny model")
    parser.add_argument("--output", default=None, help="folder to write (default: that model's cache)")
    args = parser.parse_args(argv)
    path = build_tiny_checkpoint(args.output or default_cache_dir(args.model_id), model_id=args.model_id)
    print(f"{path}  sha256 {checkpoint_digest(path)[:16]}")


if __name__ == "__main__":
    main()
