"""Model ids -> diffusers folders, and the torch modules read from them.

`--model_id` takes `tiny-random` (built offline on first use), a local diffusers folder (model_index.json,
tokenizer/, text_encoder/, transformer/, vae/, scheduler/), or a Hugging Face hub id (downloaded where a hub
is reachable).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tpu_wan import tiny
from tpu_wan.config import DTYPES
from tpu_wan.errors import CheckpointError

COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")


def resolve_model(model_id: str) -> Path:
    """The local folder for `model_id`, building or downloading it if needed."""
    if model_id == tiny.TINY_MODEL_ID:
        return _checked(tiny.ensure_tiny_checkpoint())
    path = Path(model_id).expanduser()
    if path.exists():
        return _checked(path)
    if model_id.count("/") != 1 or model_id.startswith((".", "/", "~")):
        raise CheckpointError(f"model_id: expected a diffusers folder or a hub id 'org/name', found {model_id!r}")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "tokenizer/*"])
    except Exception as err:  # offline, network, auth, missing repo: all end the same way for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        why = "HF_HUB_OFFLINE is set and the hub cache does not hold it" if offline else type(err).__name__
        raise CheckpointError(
            f"model_id {model_id!r}: expected a local folder ({path.resolve()} does not exist) or a downloadable "
            f"hub repo, found neither ({why}); pass --model_id /path/to/Wan2.1-T2V-...-Diffusers"
        ) from None
    return _checked(Path(folder))  # outside the try: a downloaded folder that does not fit says why


EXPECTED_CLASSES = {
    "text_encoder": "UMT5EncoderModel", "transformer": "WanTransformer3DModel", "vae": "AutoencoderKLWan",
}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: expected a JSON file, found unreadable content ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# The configs of the published Wan 2.1 text-to-video models (their config.json files' facts; no weights, no
# tokenizer), so a compile-only run (tpu_wan.aot) works offline.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "model_configs"
PACKAGED_MODELS = {f"Wan-AI/{name}": name for name in ("Wan2.1-T2V-1.3B-Diffusers", "Wan2.1-T2V-14B-Diffusers")}


def resolve_configs(model_id: str) -> Path:
    """A folder holding `model_id`'s config files, for compiling its programs without its weights: the
    packaged configs of the two published models, tiny-random (built offline), or a local diffusers folder
    (weight files optional). Nothing is downloaded."""
    if model_id in PACKAGED_MODELS:
        return _checked(PACKAGED_CONFIGS / PACKAGED_MODELS[model_id], with_tokenizer=False)
    if model_id == tiny.TINY_MODEL_ID or Path(model_id).expanduser().exists():
        return resolve_model(model_id)
    raise CheckpointError(f"model_id: expected {', '.join(PACKAGED_MODELS)}, tiny-random or a local diffusers "
                          f"folder to compile without weights, found {model_id!r}")


def config_folder(model_id: str) -> Path:
    """A folder holding `model_id`'s config files, to decide settings before loading: the packaged configs of the
    two published models, tiny-random, a local folder (tokenizer and weights optional), else the hub's download."""
    if model_id in PACKAGED_MODELS or model_id == tiny.TINY_MODEL_ID:
        return resolve_configs(model_id)
    path = Path(model_id).expanduser()
    return _checked(path, with_tokenizer=False) if path.exists() else resolve_model(model_id)


def _checked(path: Path, with_tokenizer: bool = True) -> Path:
    """`path` if it is a Wan 2.1 text-to-video diffusers folder whose parts fit together."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{path}: expected a diffusers folder with model_index.json, found none")
    index = _read_json(index_file)
    if index.get("_class_name") != "WanPipeline":
        raise CheckpointError(f"{index_file}: expected _class_name 'WanPipeline', found {index.get('_class_name')!r}")
    for component, cls in EXPECTED_CLASSES.items():
        found = (index.get(component) or [None, None])[1]
        if found != cls:
            raise CheckpointError(f"{index_file}: expected {component} of class {cls}, found {found!r}")
    components = COMPONENTS if with_tokenizer else tuple(c for c in COMPONENTS if c != "tokenizer")
    missing = [c for c in components if not (path / c / ("scheduler_config.json" if c == "scheduler" else
                                                         "config.json" if c != "tokenizer" else "")).exists()]
    if missing:
        raise CheckpointError(f"{path}: expected configs for {list(components)}, missing {missing}")
    text_dim = read_config(path, "transformer").get("text_dim")
    d_model = read_config(path, "text_encoder").get("d_model")
    if text_dim != d_model:
        raise CheckpointError(f"{path}: expected transformer text_dim == text encoder d_model, found {text_dim} != {d_model}")
    return path


def read_config(model_path: Path, component: str, required: tuple[str, ...] = ()) -> dict:
    """A component's config json; `required` keys missing from it are refused, naming the file."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    config = _read_json(model_path / component / name)
    missing = [key for key in required if key not in config]
    if missing:
        raise CheckpointError(f"{model_path / component / name}: expected keys {missing}, found none of them "
                              f"(is this a Wan 2.1 diffusers folder?)")
    return config


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"expected a dtype in {DTYPES}, found {dtype!r}")
    return getattr(torch, dtype)


def _empty(build):
    """A module built with its parameters on the meta device (no storage) and its buffers computed for real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build().eval()


def empty_transformer(model_path: Path):
    from diffusers import WanTransformer3DModel

    config = WanTransformer3DModel.load_config(model_path / "transformer")
    return _empty(lambda: WanTransformer3DModel.from_config(config))


def empty_text_encoder(model_path: Path):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config.from_pretrained(model_path / "text_encoder")
    model = _empty(lambda: UMT5EncoderModel(config))
    model.tie_weights()  # from_pretrained ties encoder.embed_tokens to shared; an empty build must do it itself
    return model


def expected_weights(module, dtype: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, numpy dtype) of each parameter to load, with diffusers' dtype policy: parameters of the
    modules a diffusers model lists in `_keep_in_fp32_modules` (norms, time embedder, ...) stay float32, as
    `from_pretrained(torch_dtype=...)` keeps them. (transformers applies its list to float16 only.)"""
    import ml_dtypes

    from tpu_wan.torchax_env import meta_parameters

    keep = getattr(module, "_keep_in_fp32_modules", None) or [] if _is_diffusers(module) else []
    target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    return {
        name: (shape, np.dtype(np.float32) if any(m in name.split(".") for m in keep) else target)
        for name, (shape, _) in meta_parameters(module).items()
    }


def _is_diffusers(module) -> bool:
    return type(module).__module__.startswith("diffusers.")


def load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path / "tokenizer")


def load_text_encoder(model_path: Path, dtype: str):
    """UMT5EncoderModel as transformers' from_pretrained loads it: the reference the sharded loader is checked
    against (the stages use empty_text_encoder + tpu_wan.loading)."""
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel.from_pretrained(model_path / "text_encoder", dtype=_torch_dtype(dtype)).eval()


def load_transformer(model_path: Path, dtype: str):
    """WanTransformer3DModel as diffusers' from_pretrained loads it: the reference the sharded loader is checked
    against (the stages use empty_transformer + tpu_wan.loading)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(model_path / "transformer", torch_dtype=_torch_dtype(dtype)).eval()
