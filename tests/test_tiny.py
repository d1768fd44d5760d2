"""The tiny checkpoint is deterministic and is a Wan 2.1 diffusers folder."""

import json
import re
import shutil

import huggingface_hub
import pytest

from tpu_wan.models import checkpoints, tiny
from tpu_wan.models.checkpoints import CheckpointError


def test_rebuild_is_byte_identical(tiny_path, tmp_path):
    rebuilt = tiny.build_tiny_checkpoint(tmp_path / "tiny")
    assert tiny.checkpoint_digest(rebuilt) == tiny.checkpoint_digest(tiny_path)


def test_layout_and_wiring(tiny_path):
    index = json.loads((tiny_path / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert checkpoints.resolve_model("tiny-random") == tiny_path
    # The text encoder feeds the transformer: its width must be the transformer's text_dim.
    te = checkpoints.read_config(tiny_path, "text_encoder")
    assert te["d_model"] == checkpoints.read_config(tiny_path, "transformer")["text_dim"]
    sched = checkpoints.read_config(tiny_path, "scheduler")
    assert sched["_class_name"] == "UniPCMultistepScheduler" and sched["use_flow_sigmas"]


def test_tokenizer_covers_multilingual_prompts(tiny_path):
    tok = checkpoints.load_tokenizer(tiny_path)
    ids = tok("一只猫 plays piano!", add_special_tokens=True).input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert tok.unk_token_id not in ids  # every character is in the training corpus


def test_model_folder_validation(tiny_path, tmp_path):
    def broken(edit):
        folder = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_path, folder)
        edit(folder)
        return str(folder)

    def set_json(rel, key, value):
        def edit(folder):
            data = json.loads((folder / rel).read_text())
            data[key] = value
            (folder / rel).write_text(json.dumps(data))
        return edit

    cases = [
        (set_json("model_index.json", "_class_name", "FluxPipeline"),
         "expected _class_name 'WanPipeline' or 'WanImageToVideoPipeline', found 'FluxPipeline'"),
        (set_json("model_index.json", "vae", ["diffusers", "AutoencoderKL"]), "expected vae of class AutoencoderKLWan"),
        (set_json("transformer/config.json", "text_dim", 48), "text_dim == text encoder d_model, found 48 != 32"),
        (lambda f: (f / "scheduler" / "scheduler_config.json").unlink(), "missing ['scheduler']"),
    ]
    for edit, message in cases:
        with pytest.raises(CheckpointError, match=re.escape(message)):
            checkpoints.resolve_model(broken(edit))


def test_downloaded_folder_that_does_not_fit_says_why(tiny_path, tmp_path, monkeypatch):
    # A hub repo that downloads but is not a Wan 2.1 folder: the validation message, not a download failure.
    shutil.copytree(tiny_path, tmp_path / "snapshot")
    (tmp_path / "snapshot" / "scheduler" / "scheduler_config.json").unlink()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: str(tmp_path / "snapshot"))
    with pytest.raises(CheckpointError, match=r"missing \['scheduler'\]"):
        checkpoints.resolve_model("some-org/some-model")


def test_config_keys_a_run_needs_are_required(tiny_path, tmp_path):
    # Stage 2 checks heads, text dim and shapes from transformer/config.json before any model loads: a config
    # without one of those keys is refused naming the file and the key, not a KeyError traceback.
    shutil.copytree(tiny_path, tmp_path / "model")
    path = tmp_path / "model" / "transformer" / "config.json"
    config = json.loads(path.read_text())
    del config["patch_size"]
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: expected keys ['patch_size']")):
        checkpoints.read_config(tmp_path / "model", "transformer", ("num_attention_heads", "patch_size"))
