"""Batch generation: prompt files, seed sweeps compiled once, resume after SIGKILL, per-video names."""

import dataclasses
import logging
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import EMBED_RTOL, rel_err
from scripts import ROOT, STAGE2, run

from tpu_wan.core import artifacts, video
from tpu_wan.core.batch import SLUG_MAX, BatchError, parse_seeds, plan_videos, prompt_slugs, read_prompt_file, slugify
from tpu_wan.core.config import DEFAULT_NEGATIVE_PROMPT, AttentionOptions, ConfigError, GenerationConfig
from tpu_wan.core.errors import UserError
from tpu_wan.run import pipeline
from tpu_wan.runtime.mesh import make_mesh

PROMPTS = ("A cat playing piano", "一只小狗在雪地里奔跑")
SEEDS = (1, 2, 3)
MESH_4x2 = ("--cpu_devices", "8", "--dp", "4", "--tp", "2")  # dp=4 holds 2 CFG videos per batch
SIZE = ("--height", "32", "--width", "32", "--frames", "5", "--num_inference_steps", "3")


def test_parse_seeds():
    assert parse_seeds(["1", "2", "3"]) == [1, 2, 3]
    assert parse_seeds(["1-4", "9"]) == [1, 2, 3, 4, 9]
    for bad, fragment in ((["x"], "found 'x'"), (["5-3"], "low <= high"), (["1", "1-2"], "duplicates")):
        with pytest.raises(BatchError, match=fragment):
            parse_seeds(bad)


def test_names_are_safe_unique_and_stable():
    assert slugify("A Cat, playing PIANO!") == "a-cat-playing-piano"
    assert slugify("一只小狗") == "prompt"
    assert len(slugify("word " * 40)) <= 48
    assert prompt_slugs(["a cat", "A cat!", "一只", "狗"]) == ["a-cat", "a-cat-2", "prompt", "prompt-2"]
    names = [v.name for v in plan_videos(["a cat", "a cat"], [7, 8])]
    assert names == ["a-cat_seed7", "a-cat_seed8", "a-cat-2_seed7", "a-cat-2_seed8"]
    # A prompt whose own slug looks like a suffixed repeat: the later prompt moves on to a free name.
    assert prompt_slugs(["a cat", "a cat", "a cat 2"]) == ["a-cat", "a-cat-2", "a-cat-2-2"]
    assert prompt_slugs(["a cat 2", "a cat", "a cat"]) == ["a-cat-2", "a-cat", "a-cat-3"]


SLUG_PIECES = ("a cat", "A CAT!", "a cat 2", "a-cat-2", "a cat 2 2", "a cat 3", "a_cat", "prompt", "prompt 2",
               "prompt-2-2", "一只猫", "狗", "", "  ", "../etc/passwd", ".hidden", "CON", "x" * 60, "word " * 30)


def test_names_stay_unique_for_adversarial_prompt_lists():
    rng = random.Random(0)
    for _ in range(500):
        prompts = [rng.choice(SLUG_PIECES) for _ in range(rng.randint(1, 14))]
        slugs = prompt_slugs(prompts)
        assert len(set(slugs)) == len(slugs), (prompts, slugs)
        for slug in slugs:  # lowercase ASCII words joined by '-': no path separators, dots, '_' or leading '-'
            assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug) and len(slug) <= SLUG_MAX + 4, slug
        assert prompt_slugs(list(prompts)) == slugs  # stable
        k = rng.randint(0, len(prompts))
        assert prompt_slugs(prompts[:k]) == slugs[:k]  # appending prompts renames none of the earlier ones
        names = [v.name for v in plan_videos(prompts, [1, 11])]
        assert len(set(names)) == len(names), names


def test_prompt_file_edge_cases(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# comment\n\n  A cat  \n一只猫\nA cat\n   \n#another\n", encoding="utf-8")
    assert read_prompt_file(f) == ["A cat", "一只猫", "A cat"]  # duplicates kept: each is a video
    f.write_text("# only comments\n\n", encoding="utf-8")
    with pytest.raises(BatchError, match="expected at least one prompt line, found none"):
        read_prompt_file(f)
    f.write_bytes(b"caf\xe9\n")
    with pytest.raises(BatchError, match="expected UTF-8 text"):
        read_prompt_file(f)
    f.write_bytes(b"")
    with pytest.raises(BatchError, match="expected at least one prompt line, found none"):
        read_prompt_file(f)
    f.write_bytes("\ufeff# saved by a Windows editor\r\nA cat\r\n".encode())  # byte order mark, CRLF
    assert read_prompt_file(f) == ["A cat"]


@pytest.fixture(scope="module")
def encoder(tiny_path):
    from tpu_wan.models.text_encoder import TextEncoder

    return TextEncoder(tiny_path, make_mesh(1, 1, devices=jax.devices()[:1]), "float32")


def test_long_prompt_is_truncated_with_a_warning(encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="tpu_wan"):
        ids, mask = encoder.tokenize(["a cat " * 20, "a dog"], max_sequence_length=16)
    assert ids.shape == (2, 16) and mask[0].all() and ids[0, -1] == 1  # truncated like diffusers: ends in EOS
    assert "prompt 0 has" in caplog.text and "truncated to max_sequence_length=16" in caplog.text


def test_more_prompts_than_one_encoder_batch(encoder, diffusers_pipe):
    # 17 prompts + the negative one: stage 1 encodes them in two calls (ENCODE_BATCH 16, then 2). Every row must
    # still be its own prompt's, as diffusers encodes the whole list at once.
    import torch

    from tpu_wan.models.text_encoder import ENCODE_BATCH

    prompts = tuple(f"prompt number {i}: a {animal}" for i, animal in enumerate(["cat", "dog", "fox"] * 6))[:17]
    assert len(prompts) > ENCODE_BATCH
    cfg = GenerationConfig(model_id="tiny-random", prompts=prompts, negative_prompt="blurry", max_sequence_length=16)
    ours, ours_neg = pipeline.encode(encoder, cfg)
    with torch.no_grad():
        ref, ref_neg = diffusers_pipe.encode_prompt(list(prompts), "blurry", max_sequence_length=16)
    assert ours.shape == ours_neg.shape == tuple(ref.shape) == (17, 16, 32)
    for i in range(17):
        assert rel_err(ours[i], ref[i]) <= EMBED_RTOL, i
        assert rel_err(ours_neg[i], ref_neg[i]) <= EMBED_RTOL, i


# The stages as library calls in this process (the scripts are thin wrappers over them; the command-line
# contract is tested with subprocesses where it matters: exit codes, SIGKILL, log levels).
SAMPLING = pipeline.Stage2Settings(height=32, width=32, frames=5, num_inference_steps=3, seeds=SEEDS)


def stage2(input_dir, output_dir, sampling=SAMPLING, **kwargs):
    return pipeline.run_stage2(input_dir, sampling, output_dir=output_dir, dp=4, tp=2, **kwargs)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("sweep")
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    pipeline.run_stage1("tiny-random", list(PROMPTS), DEFAULT_NEGATIVE_PROMPT, out, dp=4, tp=2)
    return out


@pytest.fixture(scope="module")
def swept(stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("swept")
    stage2(stage1, out)
    return out


@pytest.mark.parametrize("sharding", ["megatron", "sequence"])
def test_sweep_compiles_once_and_equals_single_runs(stage1, tmp_path, caplog, sharding):
    # In process, on the same 4x2 mesh as the scripts: the whole sweep (6 videos, 3 batches of 2) compiles the
    # denoising step once, and each video equals its own single run bit for bit, in either sharding mode.
    mesh = make_mesh(4, 2)
    cfg = pipeline.resolve_stage2(
        GenerationConfig.from_json_dict(artifacts.load_config(stage1)),
        pipeline.Stage2Settings(height=32, width=32, frames=5, num_inference_steps=3, seeds=SEEDS, dtype="float32",
                              sharding=sharding),
        mesh,
    )
    assert cfg.stage2.batch_size == 2 and cfg.stage2.sharding == sharding
    prompt_embeds, negative_embeds = artifacts.load_embeddings(stage1)
    denoiser = pipeline.load_denoiser(pipeline.checkpoints.resolve_model("tiny-random"), mesh, "float32", "auto")
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        sweep_latents = pipeline.denoise(denoiser, cfg, prompt_embeds, negative_embeds, progress=False)
    compiles = [r for r in caplog.records if "Finished XLA compilation" in r.getMessage() and "_denoise_step" in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage() for r in compiles]
    videos = pipeline.plan(cfg)
    for v, latents in zip(videos, sweep_latents):
        single = cfg.replace(prompts=(cfg.prompts[v.prompt_index],), seeds=(v.seed,))
        rows = slice(v.prompt_index, v.prompt_index + 1)
        alone = pipeline.denoise(denoiser, single, prompt_embeds[rows], negative_embeds[rows], progress=False)
        np.testing.assert_array_equal(latents, alone[0], err_msg=v.name)
    assert len({latents.tobytes() for latents in sweep_latents}) == 6  # seeds and prompts all matter


def test_sweep_files_match_in_process_results(swept, stage1):
    names = sorted(artifacts.list_video_latents(swept))
    expected = sorted(v.name for v in plan_videos(PROMPTS, SEEDS))
    assert names == expected == sorted(["a-cat-playing-piano_seed1", "a-cat-playing-piano_seed2",
                                        "a-cat-playing-piano_seed3", "prompt_seed1", "prompt_seed2", "prompt_seed3"])
    cfg = artifacts.load_config(swept)
    assert cfg["prompts"] == list(PROMPTS) and cfg["seeds"] == list(SEEDS) and cfg["batch_size"] == 2
    assert (cfg["attention"], cfg["k_smooth"], cfg["window_size"], cfg["bqsize"]) == ("auto", False, None, None)


LONG = ("--height", "32", "--width", "32", "--frames", "5", "--num_inference_steps", "10", "--seeds", "1-4")


def test_kill_mid_sweep_then_resume(stage1, tmp_path, caplog):
    # 8 videos in 4 batches of 2: SIGKILL the script once the first batch has landed, rerun, compare with an
    # uninterrupted run. Each video is its own file, so the kill may also fall between the two files of a batch.
    uninterrupted, out = tmp_path / "uninterrupted", tmp_path / "resumed"
    long = dataclasses.replace(SAMPLING, num_inference_steps=10, seeds=tuple(range(1, 5)))
    stage2(stage1, uninterrupted, long)
    cmd = [sys.executable, str(STAGE2), "--input_dir", str(stage1), "--output_dir", str(out), *LONG, *MESH_4x2]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(artifacts.list_video_latents(out)) < 2 and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = artifacts.list_video_latents(out)
    assert 2 <= len(first) < 8, sorted(first)  # the first batch, not all of them
    stats = {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in first.items()}
    with caplog.at_level(logging.INFO, logger="tpu_wan"):
        stage2(stage1, out, long)
    assert f"resuming: {len(first)} of 8 videos already" in caplog.text
    done = artifacts.list_video_latents(out)
    assert len(done) == 8
    assert {name: (done[name].stat().st_ino, done[name].stat().st_mtime_ns) for name in first} == stats
    for name, path in artifacts.list_video_latents(uninterrupted).items():
        np.testing.assert_array_equal(artifacts.load_latents(done[name]), artifacts.load_latents(path), err_msg=name)
    assert not [p for p in (out / artifacts.LATENTS_DIR).iterdir() if p.name.startswith(".")]  # no temp files


@pytest.mark.parametrize("change,expected", [
    (dict(num_inference_steps=4), "num_inference_steps: 3 -> 4"),
    (dict(attention=AttentionOptions(window_size=4)), "window_size: None -> 4"),  # local attention: other latents
], ids=["steps", "window_size"])
def test_rerun_with_other_settings_is_refused(swept, stage1, change, expected):
    before = {n: p.read_bytes() for n, p in artifacts.list_video_latents(swept).items()}
    with pytest.raises(ConfigError, match=re.escape(expected) + ".*--overwrite"):
        stage2(stage1, swept, dataclasses.replace(SAMPLING, **change))
    assert {n: p.read_bytes() for n, p in artifacts.list_video_latents(swept).items()} == before


def test_resuming_a_folder_from_before_attention_was_recorded_is_refused(tmp_path):
    from tpu_wan.run import sweep

    cfg = pipeline.resolve_stage2(GenerationConfig(model_id="tiny-random", prompts=("a cat",), negative_prompt=""),
                                    pipeline.Stage2Settings(), make_mesh(4, 2))
    old = {k: v for k, v in cfg.to_json_dict().items() if k not in ("attention", "k_smooth", "window_size")}
    artifacts.save_config(tmp_path, old)
    artifacts.save_latents(tmp_path / artifacts.LATENTS_FILE, np.zeros((1, 16, 2, 8, 12), np.float32))
    with pytest.raises(ConfigError, match="attention: None -> 'auto'; k_smooth: None -> False"):
        sweep.pending(tmp_path, cfg, pipeline.plan(cfg), overwrite=False)


def test_mismatch_message_cuts_long_values(tmp_path):
    # A prompt file of many long prompts: the refusal names the field and stays one readable line.
    from tpu_wan.run import sweep

    def cfg(prompts):
        return pipeline.resolve_stage2(GenerationConfig(model_id="tiny-random", prompts=prompts, negative_prompt=""),
                                         pipeline.Stage2Settings(), make_mesh(4, 2))

    old = cfg(tuple(f"prompt {i}: " + "a very long description " * 10 for i in range(50)))
    artifacts.save_config(tmp_path, old.to_json_dict())
    artifacts.save_latents(tmp_path / artifacts.LATENTS_FILE, np.zeros((1, 16, 2, 8, 12), np.float32))
    new = cfg(("a cat",))
    with pytest.raises(ConfigError, match=r"prompts: \['prompt 0: a very .*\.\.\.\] -> \['a cat'\]") as err:
        sweep.pending(tmp_path, new, pipeline.plan(new), overwrite=False)
    assert len(str(err.value)) < 400, str(err.value)


def test_rerun_of_a_finished_sweep_does_nothing(swept, stage1):
    # The script: the default log level says so; --log_level reaches the project's own logger, and ERROR leaves
    # only errors (none here).
    files = [*artifacts.list_video_latents(swept).values(), swept / artifacts.CONFIG_FILE,
             swept / artifacts.METRICS_FILE]
    stats = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files]
    proc = run(STAGE2, "--input_dir", stage1, "--output_dir", swept, *SIZE, "--seeds", "1-3", *MESH_4x2)
    assert "all 6 videos already in" in proc.stderr and "--overwrite to redo" in proc.stderr
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files] == stats  # no model loaded, nothing written
    quiet = run(STAGE2, "--input_dir", stage1, "--output_dir", swept, *SIZE, "--seeds", "1-3", *MESH_4x2,
                "--log_level", "ERROR")
    assert quiet.stderr.strip() == "", quiet.stderr


def test_overwrite_redoes_every_video(swept, stage1, tmp_path, caplog):
    out = tmp_path / "again"
    shutil.copytree(swept, out)
    stale = out / artifacts.LATENTS_DIR / "stale_seed9.safetensors"  # a video the new settings do not make
    shutil.copy(out / artifacts.LATENTS_DIR / "prompt_seed1.safetensors", stale)
    old = {n: (p.stat().st_ino, p.stat().st_mtime_ns) for n, p in artifacts.list_video_latents(out).items()}
    with caplog.at_level(logging.INFO, logger="tpu_wan"):
        stage2(stage1, out, overwrite=True)
    assert "resuming" not in caplog.text and "already in" not in caplog.text
    new = artifacts.list_video_latents(out)
    assert sorted(new) == sorted(artifacts.list_video_latents(swept))  # the stale one is gone
    for name, path in artifacts.list_video_latents(swept).items():
        assert (new[name].stat().st_ino, new[name].stat().st_mtime_ns) != old[name], name  # written anew
        np.testing.assert_array_equal(artifacts.load_latents(new[name]), artifacts.load_latents(path), err_msg=name)


def test_true_single_run_equals_its_sweep_video(stage1, swept, tmp_path):
    # Stage 1 for one prompt alone and stage 2 for one seed, as a user would run them, on the sweep's mesh and
    # batch size. In the sweep, (prompt 1, seed 1) shared its batch with prompt 0 and its stage-1 call with
    # prompt 0; here it is alone in both (its batch padded with itself).
    pipeline.run_stage1("tiny-random", [PROMPTS[1]], DEFAULT_NEGATIVE_PROMPT, tmp_path, dp=4, tp=2)
    stage2(tmp_path, tmp_path, dataclasses.replace(SAMPLING, seeds=(1,), batch_size=2))
    embeds, negative = artifacts.load_embeddings(tmp_path)
    sweep_embeds, sweep_negative = artifacts.load_embeddings(stage1)
    np.testing.assert_array_equal(embeds[0], sweep_embeds[1])
    np.testing.assert_array_equal(negative[0], sweep_negative[1])
    video = plan_videos(PROMPTS, SEEDS)[3]
    assert (video.prompt_index, video.seed) == (1, 1)
    np.testing.assert_array_equal(artifacts.load_latents(tmp_path / artifacts.LATENTS_FILE),
                                  artifacts.load_latents(artifacts.video_latents_path(swept, video.name)))


def test_stage3_names_every_video(swept, tmp_path):
    pipeline.run_stage3(swept, output_dir=tmp_path, dp=4, tp=2)
    mp4s = sorted(p.name for p in tmp_path.glob("*.mp4"))
    assert mp4s == sorted(f"{v.name}.mp4" for v in plan_videos(PROMPTS, SEEDS))
    frames, fps = video.read_video(tmp_path / mp4s[0])
    assert frames.shape == (5, 32, 32, 3)
    with pytest.raises(ConfigError, match="--output_video: expected one video, found 6: use --output_dir"):
        pipeline.run_stage3(swept, output_video=tmp_path / "one.mp4")


def test_generate_flax_sweep_equals_staged(stage1, swept, tmp_path):
    from tpu_wan.run import oneshot

    oneshot.generate("tiny-random", list(PROMPTS), DEFAULT_NEGATIVE_PROMPT, SAMPLING, dp=4, tp=2, warmup_steps=1,
                     output_dir=tmp_path / "videos", save_intermediates=tmp_path)
    assert sorted(p.name for p in (tmp_path / "videos").glob("*.mp4")) == sorted(
        f"{v.name}.mp4" for v in plan_videos(PROMPTS, SEEDS))
    ours = artifacts.list_video_latents(tmp_path)
    for name, path in artifacts.list_video_latents(swept).items():
        np.testing.assert_array_equal(artifacts.load_latents(ours[name]), artifacts.load_latents(path), err_msg=name)


def test_refused_overwrite_keeps_previous_results(swept, stage1):
    before = {n: p.read_bytes() for n, p in artifacts.list_video_latents(swept).items()}
    missing = dataclasses.replace(SAMPLING, transformer_checkpoint=str(swept / "missing.safetensors"))
    with pytest.raises(UserError, match="expected a file, found nothing"):
        stage2(stage1, swept, missing, overwrite=True)
    assert {n: p.read_bytes() for n, p in artifacts.list_video_latents(swept).items()} == before
