"""Weights from safetensors straight into sharded jax arrays, with no torch copy in host memory.

The torch module is built with empty (meta) parameters; every parameter is then read from the checkpoint
files (one file, or several named by an index json) into the NamedSharding its rule gives. Each process reads,
per tensor, the dim-0 row ranges its own devices hold, once per distinct slice: copies of a slice on several
devices of the process (dp replicas) share one read, and a tensor split on a later dimension (a row-parallel
weight, [out, in] split on in) is read once in whole rows, in chunks of at most `CHUNK_BYTES`, and each device's
columns are cut from those chunks. Host memory therefore peaks at about one tensor's local slices (plus one
chunk), not the model. Buffers the checkpoint does not store (RoPE tables) are computed by the module itself
and placed replicated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors can return BF16 tensors)
import numpy as np
from jax.sharding import NamedSharding

from tpu_wan.core.errors import LoadError
from tpu_wan.runtime import mesh as mesh_lib
from tpu_wan.runtime import stacking

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


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
# Largest block of whole rows read at once when devices hold column slices of a tensor: bounds the transient
# buffer (the UMT5-XXL embedding, [256384, 4096] split on its second dim, is 2.1 GB in bf16).
CHUNK_BYTES = 64 << 20

SliceKey = tuple[tuple[int, int], ...]  # (start, stop) per dimension: one device's slice of a tensor


def slice_key(index: tuple, shape: Sequence[int]) -> SliceKey:
    """(start, stop) per dimension of a tuple of slices (what a NamedSharding gives each device)."""
    bounds = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"expected contiguous device slices, found step {step} in {index}")
        bounds.append((start, stop))
    return tuple(bounds)


def _aligned_empty(shape: tuple, dtype: np.dtype) -> np.ndarray:
    # Raw bytes (bf16 has no buffer-protocol code), 64-byte aligned: jax adopts such a numpy buffer as the
    # device array on CPU without a copy, where a merely 16-byte-aligned one is copied.
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    skip = -raw.ctypes.data % _ALIGN
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


class _Readers:
    """Reads tensor slices from safetensors files with positioned reads (os.preadv) into fresh buffers.

    safetensors' own reader memory-maps the file, and every page it touches stays in the process's resident
    set until the map closes: loading 2.8 GB of weights would add 2.8 GB of file-backed RSS on top of the
    arrays themselves. Reading only the rows a shard needs into an owned buffer keeps the host footprint to
    the arrays plus one tensor's slices in flight."""

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

    def slices(self, path: Path, name: str, keys: Sequence[SliceKey]) -> dict[SliceKey, np.ndarray]:
        """tensor[key] for each distinct key: each dim-0 row range is read from the file once."""
        start, entry = self._entry(path, name)
        dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
        base = start + entry["data_offsets"][0]
        keys = list(dict.fromkeys(keys))
        if not shape:
            return {key: self._read_into(path, base, _aligned_empty((), dtype)) for key in keys[:1]}
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        by_rows: dict[tuple[int, int], list[SliceKey]] = {}
        for key in keys:
            by_rows.setdefault(key[0], []).append(key)
        out = {}
        for (r0, r1), group in by_rows.items():
            if all(key[1:] == tuple((0, n) for n in shape[1:]) for key in group):  # whole rows: read in place
                block = _aligned_empty((r1 - r0, *shape[1:]), dtype)
                out[group[0]] = self._read_into(path, base + r0 * row_bytes, block)
                continue
            # Column slices of these rows: read the rows once, a chunk at a time, and cut every slice from it.
            for key in group:
                out[key] = _aligned_empty(tuple(b - a for a, b in key), dtype)
            step = max(1, CHUNK_BYTES // max(row_bytes, 1))
            chunk = _aligned_empty((min(step, r1 - r0), *shape[1:]), dtype)
            for c0 in range(r0, r1, step):
                rows = chunk[: min(step, r1 - c0)]
                self._read_into(path, base + c0 * row_bytes, rows)
                for key in group:
                    out[key][c0 - r0 : c0 - r0 + len(rows)] = rows[(slice(None), *(slice(a, b) for a, b in key[1:]))]
        return out

    @staticmethod
    def _read_into(path: Path, offset: int, out: np.ndarray) -> np.ndarray:
        """`out` filled with the out.nbytes bytes of `path` at `offset`."""
        fd = os.open(path, os.O_RDONLY)
        try:
            view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
            while done < view.nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise LoadError(f"{path}: expected {view.nbytes} bytes at offset {offset}, found end of file")
                done += got
        finally:
            os.close(fd)
        return out


def load_sharded(
    expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    files: Mapping[str, Path],
    rules: Sequence,
    mesh,
    overrides: Mapping[str, np.ndarray] | None = None,
    adjust: Mapping[str, Callable[[SliceKey, np.ndarray], np.ndarray]] | None = None,
    key_prefix: str = "",
) -> dict[str, jax.Array]:
    """{name: array} for every expected (shape, dtype), read from `files` (or `overrides`) into its sharding.
    `adjust`: name -> a function of (device slice bounds, the slice as read) giving the slice to place, applied
    before the cast to the model dtype (LoRAs fused in float32, tpu_wan.models.lora). `key_prefix`: the files
    name each weight `key_prefix + name`."""
    overrides, adjust = overrides or {}, adjust or {}
    files = {name[len(key_prefix):]: path for name, path in files.items() if name.startswith(key_prefix)}
    missing = sorted(n for n in expected if n not in files and n not in overrides)
    if missing:
        folders = sorted({str(Path(f).parent) for f in files.values()}) or ["(no weight files)"]
        raise LoadError(f"{', '.join(folders)}: expected weights {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                        f"found {len(missing)} of the model's {len(expected)} missing")
    readers = _Readers()
    placed = {}
    for name, (shape, dtype) in expected.items():
        found = overrides[name].shape if name in overrides else readers.shape(files[name], key_prefix + name)
        if tuple(found) != tuple(shape):
            where = "--transformer_checkpoint" if name in overrides else str(files[name])
            raise LoadError(f"{where}: {name}: expected shape {tuple(shape)}, found {tuple(found)}")
        spec, _ = mesh_lib.spec_for(name, rules)
        mesh_lib.check_divisible(name, shape, spec, mesh)
        sharding = NamedSharding(mesh, spec)
        # jax.make_array_from_callback calls its callback once per addressable device and holds every result
        # until one batched transfer, so the distinct slices are read first and the callback only hands them
        # out: devices holding the same slice get the same numpy buffer (jax arrays are immutable, and on CPU
        # a donated zero-copy buffer is copied, never written).
        keys = list(dict.fromkeys(
            slice_key(i, shape) for i in sharding.addressable_devices_indices_map(tuple(shape)).values()))
        if name in overrides:
            pieces = {k: np.asarray(overrides[name][tuple(slice(a, b) for a, b in k)]) for k in keys}
        else:
            pieces = readers.slices(files[name], key_prefix + name, keys)
        for k in keys:  # one slice at a time, so a converted tensor and its source never coexist in full
            if name in adjust:
                pieces[k] = adjust[name](k, pieces[k])
            pieces[k] = _as_dtype(pieces[k], dtype)
        placed[name] = jax.make_array_from_callback(
            tuple(shape), sharding, lambda index, pieces=pieces, shape=shape: pieces[slice_key(index, shape)])
    return placed


def _as_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if x.dtype == dtype:
        return x
    out = _aligned_empty(x.shape, dtype)
    out[...] = x  # the same rounding as x.astype(dtype), into a buffer jax can adopt without a copy on CPU
    return out


def place_model(buffers: Mapping[str, np.ndarray], expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                component_dir: Path, rules: Sequence, mesh, *, abstract: bool = False,
                overrides: Mapping[str, np.ndarray] | None = None,
                adjust: Mapping[str, Callable[[SliceKey, np.ndarray], np.ndarray]] | None = None,
                layers: Sequence[str] = (), key_prefix: str = "") -> dict:
    """A model's weights on the mesh: its computed buffers placed by their rules and its parameters read from
    `component_dir` (load_sharded); with `abstract`, both as shapes and shardings only, nothing read. `layers`:
    ModuleList paths whose members' weights are read per layer, then held as one [L, ...] array per family
    (tpu_wan.runtime.stacking); `expected`, `overrides` and `adjust` name them per layer. `key_prefix`: the files
    name each weight `key_prefix + name` (load_sharded)."""
    if abstract:
        shapes = {**{name: (b.shape, b.dtype) for name, b in buffers.items()}, **expected}
        return mesh_lib.abstract_weights(stacking.stack_shapes(shapes, layers), rules, mesh)
    weights = mesh_lib.shard_weights(buffers, rules, mesh)
    weights.update(load_sharded(expected, weight_files(component_dir), rules, mesh, overrides, adjust, key_prefix))
    return stacking.stack_placed(weights, layers, rules, mesh)
