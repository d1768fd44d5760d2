"""The files the three stages hand to each other: names, layouts, validation and atomic writes.

This is the only module that knows the formats (see docs/FORMATS.md). Tensors are numpy arrays in and out;
bfloat16 arrays use ``ml_dtypes.bfloat16`` (the dtype behind ``jnp.bfloat16``) and round-trip bit-exactly.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# Importing ml_dtypes registers "bfloat16" as a numpy dtype name; safetensors' numpy reader ("np" framework)
# needs that to materialise BF16 tensors (without it: TypeError "data type 'bfloat16' not understood").
import ml_dtypes  # noqa: F401
import numpy as np
import safetensors
import safetensors.numpy

from tpu_wan.core.errors import ArtifactError

EMBEDDINGS_FILE = "stage1_embeddings.safetensors"
LATENTS_FILE = "stage2_latents.safetensors"
LATENTS_DIR = "stage2_latents"  # several videos: one <name>.safetensors each, same layout as LATENTS_FILE
FRAMES_FILE = "stage3_frames.safetensors"
CONFIG_FILE = "generation_config.json"
VIDEO_FILE = "output_video.mp4"
SCHEMA_VERSION = 1
# Dimension letters of the stage files (docs/FORMATS.md): prompts, text tokens, text hidden size; videos, latent
# channels, latent frames / height / width; videos, video frames, pixel height / width, RGB.
EMBEDDING_DIMS = ("P", "S", "Et")
# Image to video, in the embeddings file beside the text: CLIP's image embeddings (prompts, image tokens, image
# hidden size) and the conditioning latents (prompts, conditioning channels, latent frames / height / width).
IMAGE_EMBED_DIMS = ("P", "I", "Ei")
CONDITION_DIMS = ("P", "Cc", "F", "H", "W")
# key -> (dims, dtypes) of the optional tensors of the embeddings file
IMAGE_TENSORS = {"image_embeds": (IMAGE_EMBED_DIMS, ("float32", "bfloat16")),
                 "image_condition": (CONDITION_DIMS, ("float32",))}
LATENT_DIMS = ("V", "C", "F", "H", "W")
FRAME_DIMS = ("V", "T", "Hp", "Wp", "3")

FORMAT_TAG = "tpu_wan"
_RESERVED_METADATA = ("format", "schema_version", "kind")
# safetensors header dtype codes -> numpy dtype names, so messages speak numpy.
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")

PathLike = str | os.PathLike


_writes_enabled = True
# Tests set this to a file name: writing that file then stalls between the finished temp file and the rename,
# so a test can kill the process exactly there.
_STALL_ENV = "TPU_WAN_STALL_BEFORE_RENAME"


def disable_writes() -> None:
    """Makes every artifact write a no-op in this process (the processes other than 0 of a multi-process run)."""
    global _writes_enabled
    _writes_enabled = False


def writes_enabled() -> bool:
    return _writes_enabled


def atomic_write(path: PathLike, write_fn: Callable[[Path], None], *, suffix: str = ".tmp") -> Path:
    """Create or replace ``path`` all at once: ``write_fn(tmp_path)`` writes a temp file beside it, then rename.

    The temp file is ``.<name>.<random>`` + ``suffix`` in the same folder (so ``os.replace`` is an atomic rename
    on one filesystem); it is fsynced before the rename and the folder after it. On any exception, including
    KeyboardInterrupt, the temp file is removed and an existing ``path`` is left untouched. Creates the folder.
    Does nothing after ``disable_writes()``.
    """
    path = Path(path)
    if not _writes_enabled:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}"
    # Reserve the name with O_EXCL; mode 0o666 lets the umask decide permissions, as for a plain open().
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write_fn(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # fsync is per inode: this flushes whatever write_fn wrote through any descriptor
        finally:
            os.close(fd)
        if os.environ.get(_STALL_ENV) == path.name:  # the crash-safety tests signal once this line is out
            import sys
            import time

            print(f"stalled before renaming {tmp.name}", file=sys.stderr, flush=True)
            for _ in range(12000):  # short sleeps: a signal handled in another thread is seen within 50 ms
                time.sleep(0.05)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX only; directories cannot be opened this way on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----- tensor files -------------------------------------------------------------------------------------------


def _dtype_name(dtype: np.dtype | str) -> str:
    """numpy-style name for a numpy dtype or a safetensors header code ('BF16' -> 'bfloat16')."""
    if isinstance(dtype, str):
        return _DTYPE_NAMES.get(dtype, dtype)
    return np.dtype(dtype).name


def _check_layout(
    where: str,
    arrays: Mapping[str, tuple[tuple[int, ...], str]],
    dims: tuple[str, ...],
    dtypes: tuple[str, ...],
    *,
    channels_last: int | None = None,
) -> None:
    """Shared checks for writers and readers. ``arrays`` maps key -> (shape, numpy dtype name); ``dims`` is
    the dimension letters (docs/FORMATS.md), e.g. LATENT_DIMS. All arrays must have the same shape and dtype (the first one's)."""
    first_key, (first_shape, first_dtype) = next(iter(arrays.items()))
    for key, (shape, dtype) in arrays.items():
        label = f"{key} " if len(arrays) > 1 else ""
        if dtype not in dtypes:
            raise ArtifactError(f"{where}: expected {label}dtype {' or '.join(dtypes)}, found {dtype}")
        if len(shape) != len(dims):
            raise ArtifactError(
                f"{where}: expected {label}{len(dims)} dims [{', '.join(dims)}], found shape {tuple(shape)}")
        if channels_last is not None and shape[-1] != channels_last:
            raise ArtifactError(
                f"{where}: expected {label}last dim {channels_last} (RGB), found shape {tuple(shape)}")
        if key != first_key and dtype != first_dtype:
            raise ArtifactError(f"{where}: expected {key} dtype {first_dtype} (as {first_key}), found {dtype}")
        if key != first_key and tuple(shape) != tuple(first_shape):
            raise ArtifactError(
                f"{where}: expected {key} shape {tuple(first_shape)} (as {first_key}), found {tuple(shape)}")


def _build_metadata(where: str, kind: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    metadata = {"format": FORMAT_TAG, "schema_version": str(SCHEMA_VERSION), "kind": kind}
    for key, value in (extra or {}).items():
        if key in _RESERVED_METADATA:
            raise ArtifactError(
                f"{where}: expected extra metadata keys other than {list(_RESERVED_METADATA)}, found {key!r}")
        if not isinstance(key, str) or not isinstance(value, str):
            raise ArtifactError(f"{where}: expected str metadata keys and values, found {key!r}: {value!r}")
        metadata[key] = value
    return metadata


def _save_tensors(path: PathLike, kind: str, tensors: Mapping[str, Any], dims: tuple[str, ...], dtypes: tuple[str, ...],
                  metadata: Mapping[str, str] | None, *, channels_last: int | None = None,
                  optional: Mapping[str, Any] | None = None,
                  optional_layout: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] | None = None) -> Path:
    """`optional`: more tensors, each with its own (dims, dtypes) in `optional_layout`."""
    path = Path(path)
    # safetensors writes raw memory from data_ptr, so a strided view would be saved scrambled: force C order.
    arrays = {key: np.ascontiguousarray(value) for key, value in tensors.items()}
    _check_layout(str(path), {k: (a.shape, a.dtype.name) for k, a in arrays.items()}, dims, dtypes,
                  channels_last=channels_last)
    for key, value in (optional or {}).items():
        arrays[key] = np.ascontiguousarray(value)
        _check_layout(str(path), {key: (arrays[key].shape, arrays[key].dtype.name)}, *optional_layout[key])
    header = _build_metadata(str(path), kind, metadata)
    # safetensors.numpy names dtypes by dtype.name; ml_dtypes' "bfloat16" is a valid safetensors dtype, and the
    # bytes are copied verbatim, so bf16 is stored as BF16 bit-exactly. We serialise to memory rather than use
    # save_file: safetensors 0.8's save_file does its own temp-file-and-rename with mode 0600 and no fsync.
    payload = _canonical_header(safetensors.numpy.save(arrays, metadata=header))
    return atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def _canonical_header(payload: bytes) -> bytes:
    """The same file with its JSON header keys sorted, so equal tensors give equal bytes in every process.

    safetensors serialises the metadata map in hash order, which changes from process to process. Layout: u64
    little-endian header length, JSON header padded with spaces to 8-byte alignment, then the data, whose
    offsets are relative to the data start, so rewriting the header leaves them valid.
    """
    n = int.from_bytes(payload[:8], "little")
    text = json.dumps(json.loads(payload[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + payload[8 + n :]


def _load_tensors(path: PathLike, kind: str, keys: tuple[str, ...], dims: tuple[str, ...], dtypes: tuple[str, ...], *,
                  require_schema: bool = True, hint: str = "", channels_last: int | None = None,
                  optional: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] | None = None
                  ) -> dict[str, np.ndarray]:
    """Open ``path``, check header (metadata, keys, dtypes, shapes) before reading any data, then read.
    `optional`: key -> (dims, dtypes) of tensors the file may also hold (read too when present)."""
    optional = optional or {}
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ArtifactError(f"expected {path.name} in {path.parent}{hint}, found no such file")
    try:
        with safetensors.safe_open(path, framework="np") as f:
            if require_schema:
                _check_schema(where, kind, f.metadata() or {})
            found = sorted(f.keys())
            extra = [k for k in found if k in optional]
            if sorted(set(found) - set(extra)) != sorted(keys):
                noun = "key" if len(keys) == 1 else "keys"
                expected = repr(keys[0]) if len(keys) == 1 else sorted(keys)
                also = f" (and optionally {sorted(optional)})" if optional else ""
                raise ArtifactError(f"{where}: expected {noun} {expected}{also}, found {found}")
            header = {k: (tuple(f.get_slice(k).get_shape()), _dtype_name(f.get_slice(k).get_dtype()))
                      for k in (*keys, *extra)}
            _check_layout(where, {k: header[k] for k in keys}, dims, dtypes, channels_last=channels_last)
            for k in extra:
                _check_layout(where, {k: header[k]}, *optional[k])
            return {k: f.get_tensor(k) for k in (*keys, *extra)}
    except safetensors.SafetensorError as err:
        raise ArtifactError(f"{where}: expected a safetensors file, found unreadable data ({err})") from None


def _check_schema(where: str, kind: str, metadata: Mapping[str, str]) -> None:
    found_format = metadata.get("format")
    if found_format != FORMAT_TAG:
        raise ArtifactError(f"{where}: expected metadata format {FORMAT_TAG!r}, found {found_format!r}")
    found_version = metadata.get("schema_version")
    if found_version != str(SCHEMA_VERSION):
        found = "none" if found_version is None else found_version
        raise ArtifactError(f"{where}: expected schema_version {SCHEMA_VERSION}, found {found}")
    if metadata.get("kind") != kind:
        raise ArtifactError(f"{where}: expected kind {kind!r}, found {metadata.get('kind')!r}")


def save_embeddings(folder: PathLike, prompt_embeds: np.ndarray, negative_prompt_embeds: np.ndarray,
                    metadata: Mapping[str, str] | None = None, *, image: Mapping[str, np.ndarray] | None = None
                    ) -> Path:
    """Write ``folder/stage1_embeddings.safetensors``: both [P, S, Et], equal shape, float32 or bfloat16; `image`:
    the image-to-video tensors (IMAGE_TENSORS: image_condition, and image_embeds for a model with an image
    encoder), one row per prompt."""
    tensors = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
    for key, value in (image or {}).items():
        if key not in IMAGE_TENSORS or len(value) != len(prompt_embeds):
            raise ArtifactError(f"{EMBEDDINGS_FILE}: expected image tensors {sorted(IMAGE_TENSORS)} with one row per "
                                f"prompt ({len(prompt_embeds)}), found {key} of shape {tuple(value.shape)}")
    return _save_tensors(Path(folder) / EMBEDDINGS_FILE, "embeddings", tensors, EMBEDDING_DIMS, ("float32", "bfloat16"),
                         metadata, optional=image, optional_layout=IMAGE_TENSORS)


def load_embeddings(folder: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(prompt_embeds, negative_prompt_embeds)`` from ``folder``, in the dtype they were saved in."""
    t = _load_stage1(folder)
    return t["prompt_embeds"], t["negative_prompt_embeds"]


def load_image_tensors(folder: PathLike) -> dict[str, np.ndarray]:
    """The image-to-video tensors of ``folder``'s embeddings file (IMAGE_TENSORS' keys it holds; {} for text to
    video)."""
    return {k: v for k, v in _load_stage1(folder).items() if k in IMAGE_TENSORS}


def _load_stage1(folder: PathLike) -> dict[str, np.ndarray]:
    return _load_tensors(Path(folder) / EMBEDDINGS_FILE, "embeddings", ("prompt_embeds", "negative_prompt_embeds"),
                         EMBEDDING_DIMS, ("float32", "bfloat16"), hint=" (run stage 1 first)", optional=IMAGE_TENSORS)


def save_latents(path: PathLike, latents: np.ndarray, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``latents`` [V, C, F, H, W] float32 to the file ``path`` (normally ``folder / LATENTS_FILE``)."""
    return _save_tensors(path, "latents", {"latents": latents}, LATENT_DIMS, ("float32",), metadata)


def load_latents(path: PathLike, *, require_schema: bool = True) -> np.ndarray:
    """Read float32 latents [V, C, F, H, W] from the file ``path``.

    ``require_schema=False`` also accepts a plain safetensors file holding only a ``latents`` tensor of any
    float dtype (e.g. from ``safetensors.torch.save_file``, for ``--init_latents``); it is cast to float32.
    """
    dtypes = ("float32",) if require_schema else _FLOAT_NAMES
    hint = " (run stage 2 first)" if Path(path).name == LATENTS_FILE else ""
    latents = _load_tensors(path, "latents", ("latents",), LATENT_DIMS, dtypes, require_schema=require_schema,
                            hint=hint)["latents"]
    # bf16/f16 -> f32 is exact; f64 -> f32 rounds to nearest.
    return latents.astype(np.float32, copy=False)


def video_latents_path(folder: PathLike, name: str) -> Path:
    """Where the latents of the video `name` of a multi-video run live."""
    return Path(folder) / LATENTS_DIR / f"{name}.safetensors"


def list_video_latents(folder: PathLike) -> dict[str, Path]:
    """name -> latents file of every finished video of a multi-video run in `folder` (temp files excluded)."""
    root = Path(folder) / LATENTS_DIR
    if not root.is_dir():
        return {}
    return {p.stem: p for p in sorted(root.glob("*.safetensors")) if not p.name.startswith(".")}


def save_frames(folder: PathLike, frames: np.ndarray, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``folder/stage3_frames.safetensors``: frames [V, T, Hp, Wp, 3] float32, values in [0, 1]."""
    return _save_tensors(Path(folder) / FRAMES_FILE, "frames", {"frames": frames}, FRAME_DIMS, ("float32",),
                         metadata, channels_last=3)


def load_frames(folder: PathLike) -> np.ndarray:
    """Read frames [V, T, Hp, Wp, 3] float32 from ``folder``."""
    return _load_tensors(Path(folder) / FRAMES_FILE, "frames", ("frames",), FRAME_DIMS, ("float32",),
                         hint=" (run stage 3 first)", channels_last=3)["frames"]


def read_metadata(path: PathLike) -> dict[str, str]:
    """The safetensors header metadata of the file ``path`` ({} if it has none); reads no tensor data."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"expected {path.name} in {path.parent}, found no such file")
    try:
        with safetensors.safe_open(path, framework="np") as f:
            return dict(f.metadata() or {})
    except safetensors.SafetensorError as err:
        raise ArtifactError(f"{path}: expected a safetensors file, found unreadable data ({err})") from None


# ----- generation_config.json --------------------------------------------------------------------------------


def save_config(folder: PathLike, config: Mapping[str, Any]) -> Path:
    """Write ``folder/generation_config.json``: indented UTF-8 JSON, keys in insertion order, with
    ``schema_version`` first. Fields are defined by ``tpu_wan/core/config.py``; this only stores them."""
    path = Path(folder) / CONFIG_FILE
    if not isinstance(config, Mapping):
        raise ArtifactError(f"{path.name}: expected a dict, found {type(config).__name__}")
    data = {"schema_version": SCHEMA_VERSION, **{k: v for k, v in config.items() if k != "schema_version"}}
    try:
        # allow_nan=False: NaN/Infinity are not JSON and other readers would reject the file.
        text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{path.name}: expected JSON-serialisable values, found {err}") from None
    payload = text.encode("utf-8")
    return atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def load_config(folder: PathLike) -> dict[str, Any]:
    """Read ``folder/generation_config.json`` as a dict (``schema_version`` included), checking the version."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"expected {path.name} in {path.parent} (run stage 1 first), found no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: expected valid UTF-8 JSON, found {err}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object, found {type(data).__name__}")
    version = data.get("schema_version")
    # type() check: JSON true would otherwise compare equal to 1.
    if type(version) is not int or version != SCHEMA_VERSION:
        found = "none" if "schema_version" not in data else json.dumps(version, ensure_ascii=False)
        raise ArtifactError(f"{path}: expected schema_version {SCHEMA_VERSION}, found {found}")
    return data


# ----- metrics.json ------------------------------------------------------------------------------------------

METRICS_FILE = "metrics.json"
METRICS_SCHEMA = "tpu_wan.metrics/1"  # fields: docs/FORMATS.md; built by tpu_wan.runtime.profiling


def save_metrics(path: PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write a metrics document (indented JSON) atomically."""
    text = json.dumps(metrics, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_tagged_json(path: Path, schema: str, where: str | None = None) -> dict[str, Any]:
    """A JSON object whose "schema" field must be `schema` (metrics.json, a program directory's index); refused in
    one line prefixed by `where` (default: the path)."""
    where = where or str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{where}: expected valid UTF-8 JSON, found {err}") from None
    found = data.get("schema") if isinstance(data, dict) else type(data).__name__
    if found != schema:
        raise ArtifactError(f"{where}: expected schema {schema!r}, found {found!r}")
    return data


def load_metrics(path: PathLike) -> dict[str, Any]:
    """Read a metrics document, checking its schema tag."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"expected a metrics file at {path}, found no such file")
    data = read_tagged_json(path, METRICS_SCHEMA)
    stages = data.get("stages", {})
    if not isinstance(stages, dict) or not all(isinstance(s, dict) for s in stages.values()):
        raise ArtifactError(f"{path}: expected 'stages' to map stage names to objects, found {stages!r:.80}")
    return data
