"""Weights from safetensors straight into sharded jax arrays, with no torch copy in host memory.

The torch module is built with empty (meta) parameters; every parameter is then read, slice by slice, from the
checkpoint files into the NamedSharding its rule gives (`jax.make_array_from_callback`), so each process reads
only the shards its own devices hold and host memory peaks at about one tensor, not the model. Buffers the
checkpoint does not store (RoPE tables) are computed by the module itself and placed replicated.
"""

from __future__ import annotations

import json
import os
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
            try:
                weight_map = json.loads((component_dir / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise LoadError(f"{component_dir / index}: expected JSON with a weight_map, found {err!r:.100}") from None
            return {name: component_dir / file for name, file in weight_map.items()}
    for single in WEIGHT_FILES:
        if (component_dir / single).is_file():
            from safetensors import safe_open

            with safe_open(component_dir / single, framework="np") as f:
                return {name: component_dir / single for name in f.keys()}
    raise LoadError(f"{component_dir}: expected {WEIGHT_FILES[0]} or an index json, found neither")


_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


_ALIGN = 64


class _Readers:
    """Reads tensor slices from safetensors files with positioned reads (os.preadv) into fresh buffers.

    safetensors' own reader memory-maps the file, and every page it touches stays in the process's resident
    set until the map closes: loading 2.8 GB of weights would add 2.8 GB of file-backed RSS on top of the
    arrays themselves. Reading only the rows a shard needs into an owned buffer keeps the host footprint to
    the arrays plus one shard in flight."""

    def __init__(self):
        self._headers: dict[Path, tuple[int, dict]] = {}

    def _entry(self, path: Path, name: str) -> tuple[int, dict]:
        if path not in self._headers:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._headers[path] = (8 + n, json.loads(f.read(n)))
        start, header = self._headers[path]
        return start, header[name]

    def shape(self, path: Path, name: str) -> tuple[int, ...]:
        return tuple(self._entry(path, name)[1]["shape"])

    def slice(self, path: Path, name: str, index) -> np.ndarray:
        """tensor[index] for a tuple of slices (what jax.make_array_from_callback asks for)."""
        start, entry = self._entry(path, name)
        dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
        if not shape:
            return self._read(path, start + entry["data_offsets"][0], dtype, (), 1)
        rows = range(*index[0].indices(shape[0]))  # shards split dim 0 into contiguous runs of rows
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        offset = start + entry["data_offsets"][0] + rows.start * row_items * dtype.itemsize
        block = self._read(path, offset, dtype, (len(rows), *shape[1:]), len(rows) * row_items)
        rest = tuple(index[1:])
        return np.ascontiguousarray(block[(slice(None), *rest)]) if any(s != slice(None) for s in rest) else block

    @staticmethod
    def _read(path: Path, offset: int, dtype: np.dtype, shape: tuple, count: int) -> np.ndarray:
        nbytes = count * dtype.itemsize
        # Raw bytes (bf16 has no buffer-protocol code), 64-byte aligned: jax adopts such a numpy buffer as the
        # device array on CPU without a copy, where a merely 16-byte-aligned one is copied.
        raw = np.empty(nbytes + _ALIGN, np.uint8)
        skip = -raw.ctypes.data % _ALIGN
        out = raw[skip : skip + nbytes]
        fd = os.open(path, os.O_RDONLY)
        try:
            view, done = memoryview(out), 0
            while done < view.nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise LoadError(f"{path}: expected {view.nbytes} bytes at offset {offset}, found end of file")
                done += got
        finally:
            os.close(fd)
        return out.view(dtype).reshape(shape)


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
        folders = sorted({str(Path(f).parent) for f in files.values()}) or ["(no weight files)"]
        raise LoadError(f"{', '.join(folders)}: expected weights {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                        f"found {len(missing)} of the model's {len(expected)} missing")
    readers = _Readers()
    placed = {}
    for name, (shape, dtype) in expected.items():
        found = overrides[name].shape if name in overrides else readers.shape(files[name], name)
        if tuple(found) != tuple(shape):
            where = "--transformer_checkpoint" if name in overrides else str(files[name])
            raise LoadError(f"{where}: {name}: expected shape {tuple(shape)}, found {tuple(found)}")
        spec, _ = mesh_lib.spec_for(name, rules)
        mesh_lib.check_divisible(name, shape, spec, mesh)
        if name in overrides:
            source = overrides[name]
            read = lambda index, source=source, dtype=dtype: np.asarray(source[index]).astype(dtype, copy=False)  # noqa: E731
        else:
            read = lambda index, name=name, dtype=dtype: readers.slice(files[name], name, index).astype(dtype, copy=False)  # noqa: E731
        placed[name] = jax.make_array_from_callback(tuple(shape), NamedSharding(mesh, spec), read)
    return placed
