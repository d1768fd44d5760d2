"""Model presets and how explicit settings override them."""

import argparse
import json
import shutil

import pytest

from tpu_wan.core.config import ConfigError, GenerationConfig, preset_for
from tpu_wan.models import checkpoints
from tpu_wan.run import pipeline
from tpu_wan.runtime.mesh import make_mesh


def _resolve(model_id, **given):
    cfg = GenerationConfig(model_id=model_id, prompts=("a cat",), negative_prompt="")
    return pipeline.resolve_stage2(cfg, pipeline.Stage2Settings(**given), make_mesh(2, 4))


def test_presets_fill_what_the_user_left_out():
    big = _resolve("Wan-AI/Wan2.1-T2V-14B-Diffusers")
    assert (big.stage2.height, big.stage2.width, big.stage2.frames, big.stage2.num_inference_steps, big.stage2.flow_shift) == (720, 1280, 81, 50, 5.0)
    small = _resolve("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert (small.stage2.height, small.stage2.width, small.stage2.flow_shift, small.stage2.guidance_scale) == (480, 832, 3.0, 5.0)
    assert preset_for("/models/Wan2.1-T2V-1.3B-Diffusers/") == preset_for("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert preset_for("/some/other/folder") == preset_for("Wan-AI/Wan2.1-T2V-14B-Diffusers")


def test_wan22_presets_are_wans_own():
    # Wan2.2's wan/configs: t2v_A14B sample_steps 40, sample_guide_scale (3.0 low noise, 4.0 high noise),
    # boundary 0.875, sample_shift 12.0; ti2v_5B 50 steps, guidance 5.0, shift 5.0, 1280x704, 121 frames, 24 fps.
    a14b = _resolve("Wan-AI/Wan2.2-T2V-A14B-Diffusers").stage2
    assert (a14b.height, a14b.width, a14b.frames, a14b.num_inference_steps, a14b.guidance_scale, a14b.guidance_scale_2,
            a14b.boundary_ratio, a14b.flow_shift) == (720, 1280, 81, 40, 4.0, 3.0, 0.875, 12.0)
    assert _resolve("Wan-AI/Wan2.2-T2V-A14B-Diffusers", height=480, width=832).stage2.flow_shift == 12.0
    ti2v = _resolve("Wan-AI/Wan2.2-TI2V-5B-Diffusers").stage2
    assert (ti2v.height, ti2v.width, ti2v.frames, ti2v.num_inference_steps, ti2v.guidance_scale, ti2v.flow_shift,
            ti2v.guidance_scale_2, ti2v.expand_timesteps, ti2v.vae) == (
        704, 1280, 121, 50, 5.0, 5.0, None, True, "wan2.2")
    assert ti2v.latent_shape(1, 48) == (1, 48, 31, 44, 80)
    assert pipeline.model_preset("Wan-AI/Wan2.2-TI2V-5B-Diffusers").fps == 24


def test_a_folder_not_named_like_a_preset_takes_its_familys(tmp_path):
    for model, height in (("Wan2.2-T2V-A14B-Diffusers", 720), ("Wan2.2-TI2V-5B-Diffusers", 704)):
        folder = tmp_path / f"my-finetune-of-{model.split('-')[1]}"
        shutil.copytree(checkpoints.PACKAGED_CONFIGS / model, folder)
        assert _resolve(str(folder)).stage2 == _resolve(f"Wan-AI/{model}").stage2
        assert _resolve(str(folder)).stage2.height == height


def test_explicit_settings_override_presets():
    cfg = _resolve("Wan-AI/Wan2.1-T2V-14B-Diffusers", height=480, width=832, num_inference_steps=20, flow_shift=4.0)
    assert (cfg.stage2.height, cfg.stage2.width, cfg.stage2.num_inference_steps, cfg.stage2.flow_shift) == (480, 832, 20, 4.0)
    assert _resolve("Wan-AI/Wan2.1-T2V-14B-Diffusers", height=480, width=832).stage2.flow_shift == 3.0
    assert _resolve("tiny-random", guidance_scale=1.0).stage2.batch_size == 2  # no CFG: dp=2 holds 2 videos
    assert _resolve("tiny-random").stage2.batch_size == 1  # CFG: the pair fills dp=2


@pytest.mark.parametrize("model", ["Wan2.1-T2V-1.3B-Diffusers", "Wan2.1-T2V-14B-Diffusers"])
def test_flow_shift_follows_the_resolution_and_equals_the_folder_at_the_trained_size(model):
    # Whose flow_shift wins: --flow_shift if given, else the resolution's (Wan's sample_shift: 5.0 from 720p
    # up, 3.0 below), never the model folder's scheduler_config.json. WanPipeline.from_pretrained uses the
    # folder's value whatever the size; the published folders hold the value of their trained resolution, so
    # at each model's preset size the two agree (README, "equals diffusers").
    folder = checkpoints.PACKAGED_CONFIGS / model
    shipped = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["flow_shift"]
    assert _resolve(f"Wan-AI/{model}").stage2.flow_shift == shipped
    other_size = dict(height=720, width=1280) if shipped == 3.0 else dict(height=480, width=832)
    assert _resolve(f"Wan-AI/{model}", **other_size).stage2.flow_shift != shipped  # the resolution decides
    assert _resolve(str(folder), **other_size, flow_shift=shipped).stage2.flow_shift == shipped  # the flag decides


def test_a_folders_scheduler_flow_shift_is_not_read(tmp_path, tiny_path):
    folder = tmp_path / "tiny-shift-7"
    shutil.copytree(tiny_path, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"flow_shift": 7.0}))
    assert _resolve(str(folder), height=64, width=96).stage2.flow_shift == 3.0


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="frames must be 4n\\+1"):
        _resolve("tiny-random", frames=10)
    with pytest.raises(ConfigError, match="height must be a positive multiple of 16, found 40"):
        _resolve("tiny-random", height=40)


def test_attention_settings_are_recorded():
    # one value from the flags (cli.attention_options) through Stage2Settings into the config, and in the file as
    # the flags' six keys
    from tpu_wan import cli
    from tpu_wan.core.config import AttentionOptions

    given = dict(attention="custom", k_smooth=True, window_size=8, bqsize=64, bkvsize=128, bkvcomputesize=64)
    options = cli.attention_options(argparse.Namespace(**given))
    assert options == AttentionOptions("custom", k_smooth=True, window_size=8, bq=64, bkv=128, bkv_compute=64)
    cfg = _resolve("tiny-random", attention=options)
    assert cfg.stage2.attention == options
    assert {k: cfg.to_json_dict()[k] for k in given} == given
    assert GenerationConfig.from_json_dict(cfg.to_json_dict()) == cfg
    default = _resolve("tiny-random")
    assert default.stage2.attention == AttentionOptions() == AttentionOptions("auto", False, None, None, None, None)


def test_config_without_attention_fields_still_loads():
    # generation_config.json written before the attention settings were recorded: they load as None (unknown).
    old = _resolve("tiny-random").to_json_dict()
    for name in ("attention", "k_smooth", "window_size", "bqsize", "bkvsize", "bkvcomputesize"):
        del old[name]
    cfg = GenerationConfig.from_json_dict(old)
    assert (cfg.stage2.attention, cfg.stage2.height) == (None, 64)
    with pytest.raises(ConfigError, match="attention must be one of .* found 'fast'"):
        GenerationConfig.from_json_dict({**old, "attention": "fast"})
    with pytest.raises(ConfigError, match="window_size must be >= 0, found -1"):
        GenerationConfig.from_json_dict({**old, "attention": "auto", "window_size": -1})


def test_a_config_records_stage2_whole_or_not_at_all():
    stage1 = GenerationConfig(model_id="tiny-random", prompts=("a cat",), negative_prompt="")
    data = stage1.to_json_dict()  # after stage 1: every stage-2 key present and null
    assert data["height"] is None and data["attention"] is None
    assert GenerationConfig.from_json_dict(data).stage2 is None
    full = _resolve("tiny-random").to_json_dict()
    assert GenerationConfig.from_json_dict(full).to_json_dict() == full  # the round trip
    with pytest.raises(ConfigError, match=r"expected the stage-2 settings \['frames', 'dtype'\] to be set"):
        GenerationConfig.from_json_dict({**full, "frames": None, "dtype": None})
    with pytest.raises(ConfigError, match="sharding must be one of .* found 'auto'"):  # a record holds what ran
        GenerationConfig.from_json_dict({**full, "sharding": "auto"})
    with pytest.raises(ConfigError, match="--frames must be 4n[+]1"):  # the same checks as the flags
        GenerationConfig.from_json_dict({**full, "frames": 6})
