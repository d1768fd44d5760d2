"""LoRAs fused into the transformer's weights as they load (--lora PATH[:SCALE]; --lora_2 for the low-noise expert).

Reading: diffusers' own `WanLoraLoaderMixin.lora_state_dict` reads the file and converts every format it knows to
diffusers' keys (`transformer.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_B.bias`): diffusers/PEFT keys as they
are; the original Wan `diffusion_model.*` keys as lightx2v, Kijai and ComfyUI write them (`lora_down`/`lora_up` or
`lora_A`/`lora_B`, `alpha` folded into the factors, `diff_b` as the bias, norm and full-weight `diff` keys dropped as
diffusers drops them); kohya/musubi `lora_unet_*`. What diffusers skips silently is skipped here too; a key left after
conversion that adapts no weight of the model is refused.

Fusing, as peft's `LoraLayer.merge` does under diffusers' `fuse_lora`, for each adapted Linear (weight W [out, in],
bias b), LoRAs in the order given:

    W <- W + (B @ A) * s        b <- b + B_bias * s        s = scale * alpha / r    (alpha / sqrt(r) with rslora)

where alpha / r comes from the file's LoRA config metadata when it has one (`lora_adapter_metadata`: r, lora_alpha,
rank_pattern, alpha_pattern, use_rslora) and is 1 otherwise (diffusers: alpha = rank for every module). Everything is
float32 (the base weight upcast) and happens per device slice before the cast to the model dtype and before the
slice is placed (tpu_wan.runtime.loading's `adjust`): the compiled step is the same with or without LoRAs, and a
LoRA costs nothing per step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from tpu_wan.core.config import LoraFile
from tpu_wan.core.errors import LoraError  # noqa: F401  (raised to callers as lora.LoraError too)

log = logging.getLogger("tpu_wan")
FLAGS = {"transformer": "--lora", "transformer_2": "--lora_2"}  # expert -> the flag naming its LoRAs
PREFIX = "transformer."  # diffusers' keys for the transformer (the same for transformer_2: load_into_transformer_2)
_HASH_CHUNK = 16 << 20


def checked(loras: Sequence[LoraFile] | None, flag: str = "--lora") -> tuple[LoraFile, ...] | None:
    """`loras` with each file's sha256 filled in; refuses a missing file or one that is not .safetensors."""
    if not loras:
        return None
    out = []
    for lora in loras:
        path = Path(lora.path)
        if path.suffix != ".safetensors":
            raise LoraError(f"{flag} {lora.path}: expected a .safetensors file, found {path.suffix or 'no suffix'}")
        if not path.is_file():
            raise LoraError(f"{flag}: expected a file, found nothing at {path}")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        out.append(dataclasses.replace(lora, sha256=digest.hexdigest()))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Adapted:
    """One LoRA's factors for one Linear: A [r, in], B [out, r], B's bias [out] or None, float32, and its s."""

    a: np.ndarray
    b: np.ndarray
    bias: np.ndarray | None
    s: float


def read(lora: LoraFile, flag: str = "--lora") -> dict[str, Adapted]:
    """module name (as in the model, e.g. blocks.0.attn1.to_q) -> its factors, read and converted by diffusers."""
    import torch
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    try:
        state, metadata = WanLoraLoaderMixin.lora_state_dict(lora.path, return_lora_metadata=True)
    except Exception as err:  # diffusers' converters raise ValueError/KeyError on keys they cannot place
        raise LoraError(f"{flag} {lora.path}: expected a LoRA in a format diffusers reads, found "
                        f"{type(err).__name__}: {str(err)[:200]}") from None
    not_lora = sorted(k for k in state if "lora" not in k)
    if not_lora:  # diffusers' own check (load_lora_weights)
        raise LoraError(f"{flag} {lora.path}: expected LoRA keys (names with 'lora'), found {not_lora[0]}")
    other = sorted(k for k in state if not k.startswith(PREFIX))
    if other:
        raise LoraError(f"{flag} {lora.path}: expected keys of the transformer ({PREFIX}...), found {other[0]}")
    config = {k[len(PREFIX):]: v for k, v in (metadata or {}).items() if k.startswith(PREFIX)}
    if config.get("use_dora"):
        raise LoraError(f"{flag} {lora.path}: expected a plain LoRA, found a DoRA (use_dora in its metadata)")
    tensors = {k[len(PREFIX):]: v.to(torch.float32).numpy() for k, v in state.items()}
    modules = sorted({k.split(".lora_")[0] for k in tensors})
    out = {}
    for module in modules:
        a, b = tensors.get(f"{module}.lora_A.weight"), tensors.get(f"{module}.lora_B.weight")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"{flag} {lora.path}: expected {module}.lora_A.weight [r, in] and .lora_B.weight [out, r], "
                            f"found {None if a is None else a.shape} and {None if b is None else b.shape}")
        out[module] = Adapted(a, b, tensors.get(f"{module}.lora_B.bias"), lora.scale * _alpha_over_r(config, module))
    return out


def _alpha_over_r(config: Mapping, module: str) -> float:
    """alpha / r of `module` under a LoRA config (peft's LoraConfig fields; patterns matched as peft matches them:
    the pattern is a suffix of the module name at a dot); 1 without a config, as diffusers infers it."""
    if not config:
        return 1.0

    def lookup(patterns: Mapping, default):
        for pattern, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        return default

    r = lookup(config.get("rank_pattern"), config["r"])
    alpha = lookup(config.get("alpha_pattern"), config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


Adjust = Callable[[tuple, np.ndarray], np.ndarray]  # (device slice bounds, base slice) -> fused float32 slice


def fusions(loras: Sequence[LoraFile], expected: Mapping[str, tuple], flag: str = "--lora") -> dict[str, Adjust]:
    """weight name -> the function that fuses every LoRA of `loras` into a device slice of it (loading's `adjust`);
    refuses a LoRA module that names no Linear of the model (`expected`: name -> (shape, dtype)) or mis-fits it."""
    per_weight: dict[str, list] = {}
    for lora in loras:
        for module, f in read(lora, flag).items():
            shape = expected.get(f"{module}.weight", (None,))[0]
            if shape is None or len(shape) != 2:
                raise LoraError(f"{flag} {lora.path}: {module}: expected a Linear layer of the transformer, found no "
                                f"weight {module}.weight of that shape in the model")
            if (f.b.shape[0], f.a.shape[1]) != tuple(shape):
                raise LoraError(f"{flag} {lora.path}: {module}: expected B @ A of shape {tuple(shape)}, found "
                                f"{(f.b.shape[0], f.a.shape[1])}")
            per_weight.setdefault(f"{module}.weight", []).append(f)
            if f.bias is not None:
                if f"{module}.bias" not in expected or tuple(expected[f"{module}.bias"][0]) != f.bias.shape:
                    raise LoraError(f"{flag} {lora.path}: {module}.lora_B.bias: expected a bias of shape "
                                    f"{expected.get(f'{module}.bias', ((None,),))[0]}, found {f.bias.shape}")
                per_weight.setdefault(f"{module}.bias", []).append(f)
    log.debug("LoRA: %d weights adapted by %s", len(per_weight), ", ".join(Path(x.path).name for x in loras))
    return {name: _fuser(fs, bias=name.endswith(".bias")) for name, fs in per_weight.items()}


def _fuser(factors: list[Adapted], bias: bool) -> Adjust:
    def fuse(key: tuple, base: np.ndarray) -> np.ndarray:
        import torch

        out = torch.from_numpy(np.asarray(base, np.float32).copy())
        rows = slice(*key[0])
        for f in factors:  # peft's merge: each adapter's delta added in turn, in float32
            if bias:
                out += torch.from_numpy(f.bias[rows]) * f.s
            else:
                cols = slice(*key[1])
                out += (torch.from_numpy(f.b[rows]) @ torch.from_numpy(f.a[:, cols])) * f.s
        return out.numpy()

    return fuse
