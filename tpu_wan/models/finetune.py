"""Fine-tuned transformer weights over a base model (--transformer_checkpoint), as research codebases ship them.

Accepts a diffusers-named `.safetensors` file, or a `.pt`/`.pth` file read with `torch.load(weights_only=True)`
(no code runs from it), optionally nested under a key (`generator_ema`, `generator`, ...) and with a wrapper
prefix on every name (`model.`, `module.`, `_orig_mod.`). Tensors are read lazily, slice by slice, by the
sharded loader. Missing, unexpected or mis-shaped names are refused unless non_strict.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

from tpu_wan.core.errors import FinetuneError

log = logging.getLogger("tpu_wan")
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "transformer.")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class _SafetensorsTensor:
    def __init__(self, path: Path, name: str, shape):
        self.path, self.name, self.shape = path, name, tuple(shape)

    def __getitem__(self, index):
        from safetensors import safe_open

        with safe_open(self.path, framework="np") as f:
            return f.get_slice(self.name)[index]


class _TorchTensor:
    def __init__(self, tensor):
        self.tensor, self.shape = tensor, tuple(tensor.shape)

    def __getitem__(self, index):
        import torch

        part = self.tensor[index]
        return part.float().numpy() if part.dtype == torch.bfloat16 else part.numpy()


def read_checkpoint(path: str | Path, key: str | None = None) -> dict:
    """name -> lazily read tensor (with .shape and slicing), wrapper prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"--transformer_checkpoint: expected a file, found nothing at {path}")
    if path.suffix == ".safetensors":
        __import__("ml_dtypes")  # registers bfloat16 with numpy, so BF16 tensors read as numpy
        from safetensors import safe_open

        if key is not None:
            raise FinetuneError(f"--checkpoint_key: expected none for a .safetensors file, found {key!r}")
        try:
            with safe_open(path, framework="np") as f:
                tensors = {n: _SafetensorsTensor(path, n, f.get_slice(n).get_shape()) for n in f.keys()}
        except Exception as err:  # safetensors raises SafetensorError or OSError for unreadable files
            raise FinetuneError(f"--transformer_checkpoint {path}: expected a safetensors file, found unreadable "
                                f"data ({err})") from None
    elif path.suffix in TORCH_SUFFIXES:
        tensors = {n: _TorchTensor(t) for n, t in _torch_state_dict(path, key).items()}
    else:
        raise FinetuneError(f"--transformer_checkpoint: expected .safetensors or {TORCH_SUFFIXES}, found {path.name}")
    return _strip_prefix(tensors)


def _torch_state_dict(path: Path, key: str | None) -> dict:
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle with code, corrupt file: refused, never executed
        raise FinetuneError(f"{path}: expected a weights-only torch checkpoint, found {type(err).__name__}") from None
    if key is not None:
        if not isinstance(data, Mapping) or key not in data:
            found = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise FinetuneError(f"{path}: expected key {key!r}, found {found}")
        data = data[key]
    nested = [k for k, v in data.items() if isinstance(v, Mapping)] if isinstance(data, Mapping) else []
    if nested:
        raise FinetuneError(f"{path}: expected tensors, found nested dicts {nested}: pass --checkpoint_key")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _strip_prefix(tensors: dict) -> dict:
    for prefix in WRAPPER_PREFIXES:
        if tensors and all(n.startswith(prefix) for n in tensors):
            return _strip_prefix({n[len(prefix):]: t for n, t in tensors.items()})
    return tensors


def check_overrides(overrides: dict, expected: Mapping[str, tuple], non_strict: bool) -> dict:
    """The overrides that fit `expected` (name -> (shape, dtype)); anything else refused unless non_strict, where
    missing names keep the base weight and unexpected or mis-shaped ones are skipped (with a warning)."""
    missing = sorted(n for n in expected if n not in overrides)
    unexpected = sorted(n for n in overrides if n not in expected)
    misshaped = sorted(n for n in overrides if n in expected and tuple(overrides[n].shape) != tuple(expected[n][0]))
    problems = [
        f"{len(names)} {what} (e.g. {names[0]}" + (f": expected shape {tuple(expected[names[0]][0])}, found "
                                                   f"{tuple(overrides[names[0]].shape)})" if what == "mis-shaped" else ")")
        for what, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if names
    ]
    if problems and not non_strict:
        raise FinetuneError(
            f"--transformer_checkpoint: expected the base model's {len(expected)} weights, found "
            + "; ".join(problems) + " (--non_strict applies what fits)"
        )
    if problems:
        log.warning("fine-tuned checkpoint, non-strict: %s", "; ".join(problems))
    return {n: t for n, t in overrides.items() if n in expected and n not in misshaped}

