"""Weights from safetensors straight into sharded jax arrays, with no torch copy in host memory.

The torch module is built with empty (meta) parameters; every parameter is then read, slice by slice, from the
checkpoint files into the NamedSharding its rule gives (`jax.make_array_from_callback`), so each process reads
only the shards its own devices hold and host memory peaks at about one tensor, not the model. Buffers the
checkpoint does not store (RoPE tables) are computed by the module itself and placed replicated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors can return BF16 tensors)
import numpy as np
from jax.sharding import NamedSharding

from tpu_wan import mesh as mesh_lib
from tpu_wan.errors import UserError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


class LoadError(UserError):
    """A checkpoint that does not hold the weights the model expects."""


def weight_files(component_dir: Path) -> dict[str, Path]:
    """tensor name -> file, for a single safetensors file or a sharded one with an index json."""
    component_dir = Path(component_dir)
    for index in INDEX_FILES:
        if (component_dir / index).is_file():
            weight_map = json.loads((component_dir / index).read_text())["weight_map"]
            return {name: component_dir / file for name, file in weight_map.items()}
    for single in WEIGHT_FILES:
        if (component_dir / single).is_file():
            from safetensors import safe_open

            with safe_open(component_dir / single, framework="np") as f:
                return {name: component_dir / single for name in f.keys()}
    raise LoadError(f"{component_dir}: expected {WEIGHT_FILES[0]} or an index json, found neither")


class _Readers:
    """Open safetensors files, one handle each, for reading many slices."""

    def __init__(self):
        self._open = {}

    def _get(self, path: Path, name: str):
        from safetensors import safe_open

        if path not in self._open:
            self._open[path] = safe_open(path, framework="np")
        return self._open[path].get_slice(name)

    def slice(self, path: Path, name: str, index) -> np.ndarray:
        return self._get(path, name)[index]

    def shape(self, path: Path, name: str) -> tuple[int, ...]:
        return tuple(self._get(path, name).get_shape())


def load_sharded(
    expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    files: Mapping[str, Path],
    rules: Sequence,
    mesh,
    overrides: Mapping[str, np.ndarray] | None = None,
) -> dict[str, jax.Array]:
    """{name: array} for every expected (shape, dtype), read from `files` (or `overrides`) into its sharding."""
    overrides = overrides or {}
    missing = sorted(n for n in expected if n not in files and n not in overrides)
    if missing:
        raise LoadError(f"checkpoint: expected weights {missing[:5]}{' ...' if len(missing) > 5 else ''}, missing")
    readers = _Readers()
    placed = {}
    for name, (shape, dtype) in expected.items():
        found = overrides[name].shape if name in overrides else readers.shape(files[name], name)
        if tuple(found) != tuple(shape):
            raise LoadError(f"{name}: expected shape {tuple(shape)}, found {tuple(found)}")
        spec, _ = mesh_lib.spec_for(name, rules)
        mesh_lib.check_divisible(name, shape, spec, mesh)
        if name in overrides:
            source = overrides[name]
            read = lambda index, source=source, dtype=dtype: np.asarray(source[index]).astype(dtype)  # noqa: E731
        else:
            read = lambda index, name=name, dtype=dtype: readers.slice(files[name], name, index).astype(dtype)  # noqa: E731
        placed[name] = jax.make_array_from_callback(tuple(shape), NamedSharding(mesh, spec), read)
    return placed
