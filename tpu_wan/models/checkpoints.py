"""Model ids -> diffusers folders, and the torch modules read from them.

`--model_id` takes `tiny-random` (built offline on first use), a local diffusers folder (model_index.json,
tokenizer/, text_encoder/, transformer/, vae/, scheduler/), or a Hugging Face hub id (downloaded where a hub
is reachable). Every entry point reaches a folder through `_checked`, which refuses, from the config files alone,
any model kind the toolkit does not implement (Wan 2.2's two experts or TI2V, image-to-video, a VAE our decoder
cannot decode) before a weight is read or a program compiled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tpu_wan.core.config import DTYPES, VAE_SPATIAL, VAE_TEMPORAL
from tpu_wan.core.errors import CheckpointError
from tpu_wan.models import tiny

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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: expected a JSON file, found unreadable content ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# The configs of the published Wan text-to-video models (their config.json files' facts; no weights, no tokenizer),
# so a compile-only run (tpu_wan.run.aot) works offline. Wan 2.2's are refused by _checked like any folder of
# their kinds until those kinds are implemented.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "model_configs"
PACKAGED_MODELS = {f"Wan-AI/{name}": name for name in ("Wan2.1-T2V-1.3B-Diffusers", "Wan2.1-T2V-14B-Diffusers",
                                                        "Wan2.2-T2V-A14B-Diffusers", "Wan2.2-TI2V-5B-Diffusers")}


def resolve_configs(model_id: str) -> Path:
    """A folder holding `model_id`'s config files, for compiling its programs without its weights: the
    packaged configs of the published models, tiny-random (built offline), or a local diffusers folder
    (weight files optional). Nothing is downloaded."""
    if model_id in PACKAGED_MODELS:
        return _checked(PACKAGED_CONFIGS / PACKAGED_MODELS[model_id], with_tokenizer=False)
    if model_id == tiny.TINY_MODEL_ID or Path(model_id).expanduser().exists():
        return resolve_model(model_id)
    raise CheckpointError(f"model_id: expected {', '.join(PACKAGED_MODELS)}, tiny-random or a local diffusers "
                          f"folder to compile without weights, found {model_id!r}")


def config_folder(model_id: str) -> Path:
    """A folder holding `model_id`'s config files, to decide settings before loading: the packaged configs of the
    published models, tiny-random, a local folder (tokenizer and weights optional), else the hub's download."""
    if model_id in PACKAGED_MODELS or model_id == tiny.TINY_MODEL_ID:
        return resolve_configs(model_id)
    path = Path(model_id).expanduser()
    return _checked(path, with_tokenizer=False) if path.exists() else resolve_model(model_id)


def _checked(path: Path, with_tokenizer: bool = True) -> Path:
    """`path` if it is a Wan 2.1 text-to-video diffusers folder whose parts fit together. Every entry point
    passes here before it loads or compiles anything, so this is where a model kind the toolkit does not
    implement is refused."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{path}: expected a diffusers folder with model_index.json, found none")
    index = _read_json(index_file)
    _check_pipeline_kind(index_file, index)
    for component, cls in EXPECTED_CLASSES.items():
        found = (index.get(component) or [None, None])[1]
        if found != cls:
            raise CheckpointError(f"{index_file}: expected {component} of class {cls}, found {found!r}")
    components = COMPONENTS if with_tokenizer else tuple(c for c in COMPONENTS if c != "tokenizer")
    missing = [c for c in components if not (path / c / ("scheduler_config.json" if c == "scheduler" else
                                                         "config.json" if c != "tokenizer" else "")).exists()]
    if missing:
        raise CheckpointError(f"{path}: expected configs for {list(components)}, missing {missing}")
    _check_vae_kind(path / "vae" / "config.json", read_config(path, "vae"))
    dit = read_config(path, "transformer")
    _check_transformer_kind(path / "transformer" / "config.json", dit, WAN21_VAE["z_dim"])
    text_dim = dit.get("text_dim")
    d_model = read_config(path, "text_encoder").get("d_model")
    if text_dim != d_model:
        raise CheckpointError(f"{path}: expected transformer text_dim == text encoder d_model, found {text_dim} != {d_model}")
    return path


# model_index.json entries beyond COMPONENTS that diffusers' Wan pipelines write, and the model kind each one
# belongs to. diffusers writes an unused one as null, [null, null] or false (tiny-random has all three), so only
# a set one is refused; an entry not listed here is refused too: its effect on a run is unknown.
PIPELINE_ENTRIES = {
    "transformer_2": "two-expert Wan 2.2 models",
    "boundary_ratio": "two-expert Wan 2.2 models",
    "expand_timesteps": "Wan 2.2 TI2V models",  # one timestep per token, frame 0 kept as the image's latents
    "image_encoder": "image-to-video models",
    "image_processor": "image-to-video models",
}
# diffusers' other Wan pipelines: the same files, another task.
PIPELINE_CLASSES = {
    "WanImageToVideoPipeline": "image-to-video models",
    "WanVideoToVideoPipeline": "video-to-video models",
    "WanVACEPipeline": "VACE models",
    "WanAnimatePipeline": "Wan-Animate models",
}


def _is_set(value) -> bool:
    return not (value is None or value is False or value == [None, None])


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def _check_pipeline_kind(index_file: Path, index: dict) -> None:
    """A WanPipeline with COMPONENTS and nothing else set: the Wan 2.1 text-to-video pipeline."""
    cls = index.get("_class_name")
    extra = [key for key, value in index.items()
             if not key.startswith("_") and key not in COMPONENTS and _is_set(value)]
    order = {key: i for i, key in enumerate(PIPELINE_ENTRIES)}  # named in this order, whatever the file's
    extra.sort(key=lambda key: order.get(key, len(order)))
    if cls == "WanPipeline" and not extra:
        return
    if cls != "WanPipeline" and cls not in PIPELINE_CLASSES:
        raise CheckpointError(f"{index_file}: expected _class_name 'WanPipeline', found {cls!r}")
    found = ([] if cls == "WanPipeline" else [f"_class_name {cls!r}"]) + [
        key if isinstance(index[key], list) else f"{key}={_json(index[key])}" for key in extra]
    kinds = ([] if cls == "WanPipeline" else [PIPELINE_CLASSES[cls]]) + [
        PIPELINE_ENTRIES.get(key, f"entries such as {key!r}") for key in extra]
    raise CheckpointError(
        f"{index_file}: expected a Wan 2.1 text-to-video folder (WanPipeline with {', '.join(COMPONENTS)} only), "
        f"found {_and(found)} ({_and(list(dict.fromkeys(kinds)))} are not implemented)"
    )


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# vae/config.json as our decoder (tpu_wan.models.vae_modules) and the latent shapes (config.VAE_SPATIAL, VAE_TEMPORAL)
# take it: the Wan 2.1 VAE. Each value is also diffusers' default, which a key the file leaves out takes.
WAN21_VAE = {"z_dim": 16, "is_residual": False, "patch_size": None, "out_channels": 3,
             "scale_factor_spatial": VAE_SPATIAL, "scale_factor_temporal": VAE_TEMPORAL}


def _check_vae_kind(vae_file: Path, vae: dict) -> None:
    """The Wan 2.1 VAE: 16 latent channels, plain (non-residual) up blocks, no pixel patching, RGB out, 8x
    spatial (one upsampling per dim_mult step after the first) and 4x temporal (one per true
    temperal_downsample) compression, one latents_mean and latents_std entry per channel."""
    config = {**WAN21_VAE, **vae}
    mismatches = [(key, _json(value), _json(config[key])) for key, value in WAN21_VAE.items() if config[key] != value]
    # diffusers' defaults: dim_mult [1, 2, 4, 4], temperal_downsample [False, True, True], 16 latent statistics
    upsamplings = len(_list(vae_file, vae, "dim_mult", [1, 2, 4, 4])) - 1
    temporal = _list(vae_file, vae, "temperal_downsample", [False, True, True])
    layers = {
        "2**(len(dim_mult)-1)": (VAE_SPATIAL, 2**upsamplings),
        "len(temperal_downsample)": (upsamplings, len(temporal)),
        "2**sum(temperal_downsample)": (VAE_TEMPORAL, 2 ** sum(bool(t) for t in temporal)),
        **{f"len({key})": (WAN21_VAE["z_dim"], len(_list(vae_file, vae, key, [0.0] * WAN21_VAE["z_dim"]))) for key in
           ("latents_mean", "latents_std")},
    }
    mismatches += [(name, want, have) for name, (want, have) in layers.items() if want != have]
    if mismatches:
        raise CheckpointError(
            f"{vae_file}: expected the Wan 2.1 VAE our decoder implements "
            f"({', '.join(f'{name}={want}' for name, want, _ in mismatches)}), found "
            f"{', '.join(f'{name}={have}' for name, _, have in mismatches)} (other VAEs, such as Wan 2.2's, are not "
            f"implemented)"
        )


def _list(config_file: Path, config: dict, key: str, default: list) -> list:
    value = config.get(key, default)
    if not isinstance(value, list):
        raise CheckpointError(f"{config_file}: expected {key} to be a list, found {_json(value)}")
    return value


# transformer/config.json keys that add image conditioning (diffusers' I2V and FLF2V transformers); null in
# a text-to-video transformer.
IMAGE_CONDITIONING = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")


def _check_transformer_kind(transformer_file: Path, dit: dict, z_dim: int) -> None:
    """A text-to-video transformer denoising the VAE's latents: no image conditioning, z_dim channels in and out
    (an image-to-video transformer takes the image's latents and mask as extra input channels)."""
    image = [f"{key}={_json(dit[key])}" for key in IMAGE_CONDITIONING if dit.get(key) is not None]
    channels = {"in_channels": dit.get("in_channels", 16)}
    channels["out_channels"] = dit.get("out_channels") or channels["in_channels"]  # diffusers' fallback
    wrong = [f"{key}={value}" for key, value in channels.items() if value != z_dim]
    if image or wrong:
        why = ("image-to-video transformers are not implemented" if image else
               "a transformer denoises the VAE's latent channels")
        unset = ", ".join(f"{key}=null" for key in IMAGE_CONDITIONING)
        raise CheckpointError(
            f"{transformer_file}: expected a text-to-video transformer ({unset}, in_channels and out_channels = the "
            f"VAE's z_dim {z_dim}), found {', '.join(image + wrong)} ({why})"
        )


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


def load_transformer(model_path: Path, dtype: str):
    """WanTransformer3DModel as diffusers' from_pretrained loads it: the reference the sharded loader is checked
    against (the stages use empty_transformer + tpu_wan.runtime.loading)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(model_path / "transformer", torch_dtype=_torch_dtype(dtype)).eval()
