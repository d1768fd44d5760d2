"""Programs compiled ahead: `--compile_only --export DIR` writes each compiled program, `--programs DIR` loads it
where a run would compile it.

A program directory (docs/FORMATS.md) holds one file per program, jax's serialized executable
(`jax.experimental.serialize_executable`) with its argument and result pytree structures, and programs.json, the
index: each program's name, file and key. The key is a sha256 over everything that decides the compiled program
(`describe`): the versions that trace and compile it (jax, jaxlib, libtpu on TPU, diffusers, transformers, torchax,
flax, this package and a hash of its source), the platform and device kind, XLA_FLAGS and the jax settings that
change lowering, the mesh (shape, axis names, device ids), the abstract arguments (pytree structure; each leaf's
shape, dtype, weak type and sharding as XLA's HloSharding, so equal placements written two ways are one key) and the
caller's settings (the model config, the DiT's sharding mode, attention options, step cache): what the trace reads
besides its arguments.

`call(name, jitted, *args, **settings)` is what the models call instead of `jitted(*args)`: without a directory
(`use(None)`, the default) it is that call; with one, the first call of each program for given arguments looks its
key up, loads the program when the directory has it and otherwise logs one warning line naming what differs, and
compiles as usual. The directory is a process setting (like jax's compilation cache), set once by the scripts.
Loading executes the pickled payload: load only directories you wrote or trust.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import re
from pathlib import Path

from tpu_wan.core import artifacts
from tpu_wan.core.errors import ArtifactError

log = logging.getLogger("tpu_wan")

INDEX_FILE = "programs.json"
SCHEMA = "tpu_wan.programs/1"
PROGRAM_SUFFIX = ".jaxexe"
# The libraries whose code is traced into the programs (besides jax's own, which the environment names too).
TRACED_PACKAGES = ("jaxlib", "diffusers", "transformers", "torchax", "flax")
# jax settings that change what a traced function lowers to (the rest change dispatch, logging or caching).
JAX_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_use_shardy_partitioner")
# XLA_FLAGS that say how many virtual devices there are, not how programs compile: the mesh names the devices.
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def check_folder(folder) -> Path:
    """A program directory given to --programs: refused in one line unless it holds a readable index."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"--programs {folder}: expected a program directory (--compile_only --export DIR "
                            f"writes one), found {'a file' if folder.exists() else 'no such folder'}")
    _read_index(folder, flag=True)
    return folder


def _read_index(folder: Path, flag: bool = False) -> dict:
    path = folder / INDEX_FILE
    where = f"--programs {folder}" if flag else str(path)
    if not path.is_file():
        raise ArtifactError(f"{where}: expected {INDEX_FILE} (written by --compile_only --export DIR), found none")
    index = artifacts.read_tagged_json(path, SCHEMA, f"{where} ({INDEX_FILE})" if flag else where)
    if not isinstance(index.get("programs"), dict):
        raise ArtifactError(f"{where}: expected {INDEX_FILE} to map program names to entries, found "
                            f"{index.get('programs')!r:.80}")
    return index


# ----- the key ------------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


_CODE_HASH: str | None = None


def code_hash() -> str:
    """sha256 of this package's Python source (every file, by relative path): what traces the programs."""
    global _CODE_HASH
    if _CODE_HASH is None:
        root = Path(__file__).resolve().parents[1]
        h = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        _CODE_HASH = h.hexdigest()
    return _CODE_HASH


def _xla_flags() -> str:
    flags = os.environ.get("XLA_FLAGS", "").split()
    return " ".join(sorted(f for f in flags if not f.startswith(_DEVICE_COUNT_FLAG)))


def environment(mesh) -> dict:
    """What decides every program compiled for `mesh`'s devices (None: the default device's), besides the program
    itself."""
    import jax

    device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
    env = {"jax": jax.__version__, **{p: _version(p) for p in TRACED_PACKAGES}, "tpu_wan": _version("tpu-wan"),
           "code": code_hash(), "platform": device.platform, "device_kind": device.device_kind,
           "xla_flags": _xla_flags(), **{name: str(getattr(jax.config, name)) for name in JAX_SETTINGS}}
    if device.platform == "tpu":
        env["libtpu"] = _version("libtpu") or _version("libtpu-nightly")
        env["libtpu_init_args"] = os.environ.get("LIBTPU_INIT_ARGS", "")
    return env


def _mesh_of(args):
    import jax
    from jax.sharding import NamedSharding

    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def _canonical(value):
    """`value` as JSON data: mappings (configs included) with sorted keys, bookkeeping keys (`_name_or_path`,
    `_diffusers_version`, ...) left out; dataclasses as their fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif hasattr(value, "to_dict") and not isinstance(value, dict):  # a transformers config
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
                if not str(k).startswith("_") and not str(k).endswith("_version")}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _leaf(x):
    """(shape, dtype, weak type, sharding or None where the array is uncommitted: jax places it)."""
    import jax

    if isinstance(x, jax.Array):
        return tuple(x.shape), str(x.dtype), bool(x.aval.weak_type), x.sharding if x.committed else None
    return tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), getattr(x, "sharding", None)


def _sharding_text(sharding, ndim: int) -> str:
    if sharding is None:
        return "uncommitted"
    return str(sharding._to_xla_hlo_sharding(ndim))


def describe(name: str, args: tuple, settings: dict) -> dict:
    """The key's parts for program `name` called with `args` (arrays or ShapeDtypeStructs) under `settings`."""
    import jax

    mesh = _mesh_of(args)
    flat, tree = jax.tree_util.tree_flatten_with_path(args)
    leaves = []
    for path, x in flat:
        shape, dtype, weak, sharding = _leaf(x)
        leaves.append(f"{jax.tree_util.keystr(path)}: {dtype}{list(shape)}{' weak' if weak else ''} "
                      f"{_sharding_text(sharding, len(shape))}")
    return {
        "name": name,
        "environment": environment(mesh),
        "mesh": None if mesh is None else {"shape": {a: int(n) for a, n in mesh.shape.items()},
                                           "devices": [int(d.id) for d in mesh.devices.flat]},
        "settings": _canonical(settings),
        "arguments": {"tree": hashlib.sha256(str(tree).encode()).hexdigest(), "leaves": leaves},
    }


def key_of(parts: dict) -> str:
    """The sha256 of the parts that decide a program (its name is a label, not part of the key)."""
    decided = {k: v for k, v in parts.items() if k != "name"}
    return hashlib.sha256(json.dumps(decided, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def mismatch(parts: dict, candidates: list[dict]) -> str:
    """What differs between a program's key parts and the closest of `candidates` (stored parts of the same name),
    in a few words: the first differing version or setting, or the first differing argument."""
    def differences(other):
        out = []
        here, there = parts["environment"], other.get("environment", {})
        out += [f"{'source sha256' if k == 'code' else k} {_abbreviated(here.get(k))} here vs "
                f"{_abbreviated(there.get(k))} there"
                for k in sorted(set(here) | set(there)) if here.get(k) != there.get(k)]
        if parts["mesh"] != other.get("mesh"):
            out.append(f"mesh {_mesh_text(parts['mesh'])} here vs {_mesh_text(other.get('mesh'))} there")
        out += [f"setting {k}: {_short(x)} here vs {_short(y)} there"
                for k, x, y in _differing(parts["settings"], other.get("settings", {}))]
        mine, theirs = parts["arguments"], other.get("arguments", {})
        if mine["tree"] != theirs.get("tree"):
            out.append("the arguments' pytree structure differs")
        else:
            pairs = [(x, y) for x, y in zip(mine["leaves"], theirs.get("leaves", [])) if x != y]
            if pairs:
                x, y = pairs[0]
                more = f" (and {len(pairs) - 1} more)" if len(pairs) > 1 else ""
                out.append(f"no program with these arguments: {x} here vs {y.partition(': ')[2]} there{more}")
        return out

    found = min((differences(c) for c in candidates), key=len)
    return "; ".join(found[:2]) + (f" (and {len(found) - 2} more differences)" if len(found) > 2 else "")


def _abbreviated(value):
    """A sha256 as its first 12 hex digits, anything else as it is."""
    return value[:12] if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else value


def _differing(a, b, prefix: str = ""):
    """(dotted key, value here, value there) of each leaf where JSON data `a` and `b` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _differing(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
    elif a != b:
        yield prefix, a, b


def _mesh_text(mesh: dict | None) -> str:
    if not mesh:
        return "none"
    return " x ".join(f"{a}={n}" for a, n in mesh["shape"].items()) + f" on devices {mesh['devices']}"


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


# ----- writing ------------------------------------------------------------------------------------------------


def _file_name(name: str, key: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "program"
    return f"{slug}-{key[:16]}{PROGRAM_SUFFIX}"


def export(folder, name: str, compiled, args: tuple, **settings) -> Path | None:
    """Writes `compiled` (jitted.lower(*args).compile()) into program directory `folder` under its key and adds it
    to the index; both writes atomic. Returns the program's file (None, with a warning line, for a program jax
    cannot serialize)."""
    import jax
    from jax.experimental import serialize_executable

    # jax's persistent compilation cache hands back CPU executables that serialize without their code (loaded,
    # they fail at the first call: "Function wrapped_copy not found"): export compiles afresh (compile-only runs
    # turn the cache off).
    if jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir:
        raise RuntimeError("programs.export: expected jax's persistent compilation cache off, found it on")
    folder = Path(folder)
    parts = describe(name, args, settings)
    key = key_of(parts)
    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    except (ValueError, NotImplementedError) as err:  # e.g. constants jax passes as arguments (const_args)
        log.warning("programs: %r cannot be serialized (%s): not exported", name, " ".join(str(err).split())[:200])
        return None
    data = pickle.dumps({"schema": SCHEMA, "payload": payload, "in_tree": in_tree, "out_tree": out_tree},
                        protocol=pickle.HIGHEST_PROTOCOL)
    path = folder / _file_name(name, key)
    artifacts.atomic_write(path, lambda tmp: tmp.write_bytes(data))
    index = _read_index(folder) if (folder / INDEX_FILE).is_file() else {"schema": SCHEMA, "programs": {}}
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    index["programs"][key] = {**parts, "file": path.name, "bytes": len(data), "created": created}
    text = json.dumps(index, indent=1, ensure_ascii=False) + "\n"
    artifacts.atomic_write(folder / INDEX_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    log.info("programs: wrote %r to %s (%.1f MB)", name, path, len(data) / 1e6)
    return path


# ----- reading ------------------------------------------------------------------------------------------------


class Store:
    """A program directory opened for a run: programs loaded on first use, each decision kept for later calls."""

    def __init__(self, folder):
        self.folder = check_folder(folder)
        self.index = _read_index(self.folder)
        self._decided: dict = {}  # (name, signature, settings) -> loaded program, or None: compile as usual
        self._by_jitted: dict = {}  # (id(jitted), signature) -> (jitted, loaded program), for loaded()

    def program(self, name: str, jitted, args: tuple, settings: dict):
        """The loaded program for this call, or None (the directory has no match: `jitted` compiles)."""
        signature = _signature(args)
        memo = (name, signature, json.dumps(_canonical(settings), sort_keys=True))
        if memo not in self._decided:
            self._decided[memo] = loaded = self._load(name, args, settings)
            if loaded is not None:
                self._by_jitted[(id(jitted), signature)] = (jitted, loaded)
        return self._decided[memo]

    def loaded(self, jitted, args: tuple):
        hit = self._by_jitted.get((id(jitted), _signature(args)))
        return None if hit is None or hit[0] is not jitted else hit[1]

    def _load(self, name: str, args: tuple, settings: dict):
        from jax.experimental import serialize_executable

        parts = describe(name, args, settings)
        entry = self.index["programs"].get(key_of(parts))
        if entry is None:
            candidates = [p for p in self.index["programs"].values() if p.get("name") == name]
            if candidates:
                why = mismatch(parts, candidates)
            else:
                held = sorted({p.get("name") for p in self.index["programs"].values()})
                why = f"no program of that name (it holds {', '.join(map(repr, held)) or 'none'})"
            log.warning("programs: no match for %r in %s: %s; compiling it", name, self.folder, why)
            return None
        path = self.folder / entry["file"]
        try:
            data = pickle.loads(path.read_bytes())
            program = serialize_executable.deserialize_and_load(data["payload"], data["in_tree"], data["out_tree"])
        except Exception as err:  # noqa: BLE001  a file that does not load is a miss: the run compiles instead
            log.warning("programs: %r in %s did not load (%s); compiling it", name, path,
                        " ".join(str(err).split())[:200])
            return None
        log.info("programs: loaded %r from %s (not compiled)", name, path)
        return program


def _signature(args: tuple):
    """A cheap stand-in for the key within one process: the pytree structure and each leaf's (shape, dtype, weak
    type, sharding)."""
    import jax

    leaves, tree = jax.tree.flatten(args)
    return tree, tuple(_leaf(x) for x in leaves)


_STORE: Store | None = None


def use(folder) -> Store | None:
    """Opens program directory `folder` for this process's calls (None: no directory, every program compiles)."""
    global _STORE
    _STORE = None if folder is None else Store(folder)
    return _STORE


def call(name: str, jitted, *args, **settings):
    """`jitted(*args)`, or the program the directory holds for these arguments and `settings` (what the trace
    reads besides its arguments: the model config, modes, options), as `export` wrote it."""
    store = _STORE
    program = None if store is None else store.program(name, jitted, args, settings)
    return jitted(*args) if program is None else program(*args)


def loaded(jitted, args: tuple):
    """The program `call` loaded for `jitted` at `args` (arrays or their ShapeDtypeStructs), else None."""
    return None if _STORE is None else _STORE.loaded(jitted, args)
