"""Model ids -> diffusers folders, and the torch modules read from them.

`--model_id` takes a tiny model (`tiny-random`, `tiny-random-a14b`, `tiny-random-ti2v`: built offline on first
use), a local diffusers folder (model_index.json, tokenizer/, text_encoder/, transformer/ (and transformer_2/ for
two experts), vae/, scheduler/), or a Hugging Face hub id (downloaded where a hub is reachable). Every entry point
reaches a folder through `_checked`, which refuses, from the config files alone, any model kind the toolkit does
not implement (tpu_wan.models.kinds) before a weight is read or a program compiled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tpu_wan.core.config import DTYPES
from tpu_wan.core.errors import CheckpointError
from tpu_wan.models import kinds, tiny
from tpu_wan.models.kinds import COMPONENTS, ModelKind


def resolve_model(model_id: str) -> Path:
    """The local folder for `model_id`, building or downloading it if needed."""
    if model_id in tiny.TINY_MODELS:
        return _checked(tiny.ensure_tiny_checkpoint(model_id=model_id))
    path = Path(model_id).expanduser()
    if path.exists():
        return _checked(path)
    if model_id.count("/") != 1 or model_id.startswith((".", "/", "~")):
        raise CheckpointError(f"model_id: expected a diffusers folder or a hub id 'org/name', found {model_id!r}")
    # The config files first: a model kind this toolkit does not run is refused before its weights download.
    _checked(_download(model_id, path, ["*.json"]), with_tokenizer=False)
    return _checked(_download(model_id, path, ["*.json", "*.safetensors", "*.model", "tokenizer/*"]))


def _download(model_id: str, path: Path, patterns: list[str]) -> Path:
    """The hub snapshot of `model_id`'s files matching `patterns`; `path`: the local folder it is not."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, allow_patterns=patterns))
    except Exception as err:  # offline, network, auth, missing repo: all end the same way for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        why = "HF_HUB_OFFLINE is set and the hub cache does not hold it" if offline else type(err).__name__
        raise CheckpointError(
            f"model_id {model_id!r}: expected a local folder ({path.resolve()} does not exist) or a downloadable "
            f"hub repo, found neither ({why}); pass --model_id /path/to/Wan2.1-T2V-...-Diffusers"
        ) from None


EXPECTED_CLASSES = {
    "text_encoder": "UMT5EncoderModel", "transformer": "WanTransformer3DModel", "vae": "AutoencoderKLWan",
}
# Wan 2.1 I2V's image encoder: diffusers' published folders hold either class; both give the hidden states used.
IMAGE_ENCODER_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: expected a JSON file, found unreadable content ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# The configs of the published Wan models (their config.json files' facts; no weights, no tokenizer), so a
# compile-only run (tpu_wan.run.aot) works offline. The image-to-video ones: the transformers from diffusers'
# scripts/convert_wan_to_diffusers.py, CLIP ViT-H/14's vision tower (the image encoder the script converts with).
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "model_configs"
PACKAGED_MODELS = {f"Wan-AI/{name}": name for name in (
    "Wan2.1-T2V-1.3B-Diffusers", "Wan2.1-T2V-14B-Diffusers", "Wan2.2-T2V-A14B-Diffusers", "Wan2.2-TI2V-5B-Diffusers",
    "Wan2.1-I2V-14B-480P-Diffusers", "Wan2.1-I2V-14B-720P-Diffusers", "Wan2.2-I2V-A14B-Diffusers")}


def resolve_configs(model_id: str) -> Path:
    """A folder holding `model_id`'s config files, for compiling its programs without its weights: the
    packaged configs of the published models, tiny-random (built offline), or a local diffusers folder
    (weight files optional). Nothing is downloaded."""
    if model_id in PACKAGED_MODELS:
        return _checked(PACKAGED_CONFIGS / PACKAGED_MODELS[model_id], with_tokenizer=False)
    if model_id in tiny.TINY_MODELS or Path(model_id).expanduser().exists():
        return resolve_model(model_id)
    raise CheckpointError(f"model_id: expected {', '.join(PACKAGED_MODELS)}, tiny-random or a local diffusers "
                          f"folder to compile without weights, found {model_id!r}")


def config_folder(model_id: str) -> Path:
    """A folder holding `model_id`'s config files, to decide settings before loading: the packaged configs of the
    published models, tiny-random, a local folder (tokenizer and weights optional), else the hub's download."""
    if model_id in PACKAGED_MODELS or model_id in tiny.TINY_MODELS:
        return resolve_configs(model_id)
    path = Path(model_id).expanduser()
    return _checked(path, with_tokenizer=False) if path.exists() else resolve_model(model_id)


def _checked(path: Path, with_tokenizer: bool = True) -> Path:
    """`path` if it is a Wan text-to-video diffusers folder of a kind the toolkit implements (tpu_wan.models.kinds)
    whose parts fit together. Every entry point passes here before it loads or compiles anything, so this is where
    a model kind the toolkit does not implement is refused."""
    index, vae_kind, dits = _read_kind(path, with_tokenizer)
    text_dim = dits["transformer"].get("text_dim")
    d_model = read_config(path, "text_encoder").get("d_model")
    if text_dim != d_model:
        raise CheckpointError(f"{path}: expected transformer text_dim == text encoder d_model, found {text_dim} != "
                              f"{d_model}")
    return path


def model_kind(path: Path) -> ModelKind:
    """What the (checked) folder `path` decides about a run: its experts, boundary, timesteps and VAE."""
    index, vae_kind, dits = _read_kind(path, with_tokenizer=False)
    return kinds.model_kind(index, vae_kind, dits["transformer"])


def _read_kind(path: Path, with_tokenizer: bool) -> tuple[dict, str, dict[str, dict]]:
    """model_index.json, the VAE kind and each expert's config.json of `path`, every check of kinds passed."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{path}: expected a diffusers folder with model_index.json, found none")
    index = _read_json(index_file)
    kinds.check_pipeline(index_file, index)
    experts = kinds.EXPERTS if kinds.is_set(index.get("transformer_2")) else kinds.EXPERTS[:1]
    image_encoder = kinds.is_set(index.get("image_encoder"))
    expected = {**EXPECTED_CLASSES, **dict.fromkeys(experts, EXPECTED_CLASSES["transformer"])}
    if image_encoder:
        expected["image_encoder"] = IMAGE_ENCODER_CLASSES
    for component, cls in expected.items():
        found = (index.get(component) or [None, None])[1]
        if found not in (cls if isinstance(cls, tuple) else (cls,)):
            want = " or ".join(cls) if isinstance(cls, tuple) else cls
            raise CheckpointError(f"{index_file}: expected {component} of class {want}, found {found!r}")
    components = (COMPONENTS if with_tokenizer else tuple(c for c in COMPONENTS if c != "tokenizer")) + experts[1:]
    components += ("image_encoder",) if image_encoder else ()
    missing = [c for c in components if not (path / c / ("scheduler_config.json" if c == "scheduler" else
                                                         "config.json" if c != "tokenizer" else "")).exists()]
    if image_encoder and not (path / "image_processor" / "preprocessor_config.json").exists():
        missing.append("image_processor")
    if missing:
        raise CheckpointError(f"{path}: expected configs for {list(components)}, missing {missing}")
    vae_kind = kinds.check_vae(path / "vae" / "config.json", read_config(path, "vae"))
    dits = {expert: read_config(path, expert) for expert in experts}
    kinds.check_experts(path, index, dits)
    kinds.check_transformer(path / "transformer" / "config.json", dits["transformer"],
                            kinds.VAE_KINDS[vae_kind]["z_dim"], bool(index.get("expand_timesteps")),
                            kinds.is_image_pipeline(index), image_encoder)
    return index, vae_kind, dits


def read_config(model_path: Path, component: str, required: tuple[str, ...] = ()) -> dict:
    """A component's config json; `required` keys missing from it are refused, naming the file."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    config = _read_json(model_path / component / name)
    missing = [key for key in required if key not in config]
    if missing:
        raise CheckpointError(f"{model_path / component / name}: expected keys {missing}, found none of them "
                              f"(is this a Wan diffusers folder?)")
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


def empty_transformer(model_path: Path, component: str = "transformer"):
    from diffusers import WanTransformer3DModel

    config = WanTransformer3DModel.load_config(model_path / component)
    return _empty(lambda: WanTransformer3DModel.from_config(config))


def empty_text_encoder(model_path: Path):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config.from_pretrained(model_path / "text_encoder")
    model = _empty(lambda: UMT5EncoderModel(config))
    model.tie_weights()  # from_pretrained ties encoder.embed_tokens to shared; an empty build must do it itself
    return model


# CLIP's layers run as one loop over layers with stacked weights (tpu_wan.runtime.stacking).
CLIP_LAYERS = ("encoder.layers",)
CLIP_FILE_PREFIX = "vision_model."  # how transformers before 5 (and the published Wan folders) name CLIP's weights


def clip_key_prefix(folder: Path) -> str:
    """The prefix image_encoder/'s weight files put before the module's names: CLIP_FILE_PREFIX or none."""
    from tpu_wan.runtime.loading import weight_files

    names = weight_files(folder)
    return CLIP_FILE_PREFIX if any(name.startswith(CLIP_FILE_PREFIX) for name in names) else ""


def empty_image_encoder(model_path: Path):
    """The CLIP vision model of image_encoder/ (either class diffusers' folders name: WithProjection adds a
    projection the pipelines do not use), without its last layer: WanImageToVideoPipeline takes the
    second-to-last hidden states, which are then the last."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig.from_pretrained(model_path / "image_encoder")
    model = _empty(lambda: CLIPVisionModel(config))
    layers = model.encoder.layers
    model.encoder.layers = type(layers)(list(layers)[:-1])
    return model


def load_image_processor(model_path: Path):
    """image_processor/ as diffusers loads the component: the class model_index.json names, from transformers."""
    import transformers

    cls = _read_json(model_path / "model_index.json")["image_processor"][1]
    return getattr(transformers, cls).from_pretrained(model_path / "image_processor")


def expected_weights(module, dtype: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, numpy dtype) of each parameter to load, with diffusers' dtype policy: parameters of the
    modules a diffusers model lists in `_keep_in_fp32_modules` (norms, time embedder, ...) stay float32, as
    `from_pretrained(torch_dtype=...)` keeps them. (transformers applies its list to float16 only.)"""
    import ml_dtypes

    from tpu_wan.runtime.torchax_env import meta_parameters

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
    against (the stages use empty_text_encoder + tpu_wan.runtime.loading)."""
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel.from_pretrained(model_path / "text_encoder", dtype=_torch_dtype(dtype)).eval()


def load_transformer(model_path: Path, dtype: str, component: str = "transformer"):
    """WanTransformer3DModel as diffusers' from_pretrained loads it: the reference the sharded loader is checked
    against (the stages use empty_transformer + tpu_wan.runtime.loading)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(model_path / component, torch_dtype=_torch_dtype(dtype)).eval()
