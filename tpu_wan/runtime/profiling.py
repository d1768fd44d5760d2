"""What metrics.json records: timed sections per stage, compile time from jax's monitoring events, host and device
memory high-water marks, and the bytes of weights and of compiled programs' temporaries.

A `Recorder` collects one `StageMetrics` per stage from `section(stage, kind)` blocks, kind one of load /
warmup / run / io. A section nested in another is subtracted from it (a save inside a run counts as io only), so
the sections of all stages add up to the wall clock of the work they cover.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import resource
import statistics
import time
from pathlib import Path

from tpu_wan.core import artifacts
from tpu_wan.core.report import human_bytes

STAGES = ("text_encoder", "transformer", "vae")
SECTION_KINDS = ("load", "warmup", "run", "io")

# jax's own monitoring events (jax/_src/dispatch.py): tracing to a jaxpr, lowering to StableHLO, and the XLA
# compile, the last of which includes looking the program up in the persistent compilation cache.
_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class _CompileTotals:
    seconds: float = 0.0
    compilations: int = 0
    cache_hits: int = 0


_TOTALS = _CompileTotals()
_listening = False


def _listen_to_compiles() -> None:
    global _listening
    if _listening:
        return
    from jax import monitoring

    def on_duration(event: str, seconds: float, **_):
        if event in (_TRACE_EVENT, _LOWER_EVENT, _COMPILE_EVENT):
            _TOTALS.seconds += seconds
        if event == _COMPILE_EVENT:
            _TOTALS.compilations += 1

    def on_event(event: str, **_):
        if event == _CACHE_HIT_EVENT:
            _TOTALS.cache_hits += 1

    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)
    _listening = True


def compile_totals() -> _CompileTotals:
    """Seconds spent tracing, lowering and compiling, programs compiled (or fetched) and cache hits so far."""
    _listen_to_compiles()
    return dataclasses.replace(_TOTALS)


@contextlib.contextmanager
def compiling(into: dict[str, float], name: str):
    """Adds to into[name] the seconds jax spends tracing, lowering and compiling inside the block: around a
    program's calls, its compile seconds (the first call compiles, or fetches from the compilation cache; later
    calls add nothing)."""
    before = compile_totals().seconds
    try:
        yield
    finally:
        into[name] = into.get(name, 0.0) + compile_totals().seconds - before


def process_start_time() -> float:
    """When this process started (time.time() seconds): from /proc on Linux, else when this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22: starttime, after the name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()


def reset_host_peak() -> None:
    """Restarts the kernel's resident-set high-water mark (VmHWM) of this process, where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then host_peak_bytes() is the high-water mark of the whole process so far


def host_peak_bytes() -> int:
    """Peak resident host memory since the last reset_host_peak() (else since the process started)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_memory_stats() -> list[dict] | None:
    import jax

    stats = [d.memory_stats() for d in jax.local_devices()]
    return None if any(s is None for s in stats) else stats


def device_peak_bytes() -> int | None:
    """The largest peak_bytes_in_use over this process's devices; None where the backend keeps no stats (CPU)."""
    stats = device_memory_stats()
    return None if stats is None else max(s.get("peak_bytes_in_use", 0) for s in stats)


def device_capacity_bytes() -> int | None:
    stats = device_memory_stats()
    return None if stats is None else min(s.get("bytes_limit", 0) for s in stats) or None


def weights_bytes(tree) -> tuple[int, int]:
    """(bytes of every array in `tree` counted once, bytes held by the fullest device); replicated arrays count
    in full on each device, sharded ones by their shard."""
    import jax

    total, per_device = 0, {}
    for leaf in jax.tree.leaves(tree):
        total += leaf.nbytes
        for shard in getattr(leaf, "addressable_shards", ()):
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return total, max(per_device.values(), default=total)


def remember_program(programs: dict, name: str, jitted, *args) -> None:
    """Keeps the abstract arguments of a jitted call under `name`, for temp_bytes to ask XLA about it later."""
    import jax

    def abstract(x):  # an uncommitted array (e.g. a jnp scalar) may go to any device: no sharding
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if x.committed else None)
        return x

    programs[name] = (jitted, jax.tree.map(abstract, args))


def temp_bytes(programs: dict) -> int | None:
    """The largest XLA temp-buffer size per device among the remembered programs (activations, roughly).

    Lowering again with the same abstract arguments hits jax's in-memory caches: no second compilation; a program
    loaded from a program directory (tpu_wan.runtime.programs) answers itself."""
    from tpu_wan.runtime.programs import loaded

    sizes = []
    for jitted, args in programs.values():
        analysis = (loaded(jitted, args) or jitted.lower(*args).compile()).memory_analysis()
        if analysis is not None:
            sizes.append(analysis.temp_size_in_bytes)
    return max(sizes, default=None)


@dataclasses.dataclass
class StageMetrics:
    load_s: float = 0.0
    warmup_s: float = 0.0
    run_s: list[float] = dataclasses.field(default_factory=list)
    io_s: float = 0.0
    wall_s: float | None = None  # stage scripts: the whole stage, measured around it
    compile_s: float = 0.0  # included in the sections above
    compilations: int = 0
    cache_hits: int = 0
    weights_bytes: int = 0
    weights_bytes_per_device: int = 0
    activation_bytes_per_device: int | None = None
    program_compile_s: dict[str, float] | None = None  # each program the stage ran -> its compile_s (first call)
    peak_device_bytes: int | None = None
    peak_host_rss_bytes: int | None = None
    steps: int | None = None  # denoising steps per run
    s_per_step: float | None = None  # median over the timed runs' steps
    expert_swaps: int | None = None  # --expert_offload: how many times the experts swapped places (else None)
    expert_swap_s: float | None = None  # their total seconds (included in the run and warmup sections)
    # --cache (tpu_wan.sampling.step_cache), per run: per branch, the transformer calls that ran the block stack (of
    # `steps` each); the steps whose program ran it for some branch; with mag:calibrate, each step's ratio per branch
    block_stacks_run: dict[str, int] | None = None
    block_stacks_computed: int | None = None
    mag_ratios: dict[str, list[float]] | None = None

    def sections_s(self) -> float:
        return self.load_s + self.warmup_s + sum(self.run_s) + self.io_s


@dataclasses.dataclass
class _Open:
    stage: str
    kind: str
    start: float
    compiles: _CompileTotals
    child_s: float = 0.0
    child_compiles: _CompileTotals = dataclasses.field(default_factory=_CompileTotals)


class Recorder:
    """StageMetrics per stage, filled by timed sections and the model measurements added after loading."""

    def __init__(self):
        self.stages: dict[str, StageMetrics] = {}
        self._open: list[_Open] = []
        self._step_seconds: dict[str, list[float]] = {}

    def stage(self, name: str) -> StageMetrics:
        if name not in STAGES:
            raise ValueError(f"stage: expected one of {STAGES}, found {name!r}")
        return self.stages.setdefault(name, StageMetrics())

    @contextlib.contextmanager
    def section(self, stage: str, kind: str):
        if kind not in SECTION_KINDS:
            raise ValueError(f"section kind: expected one of {SECTION_KINDS}, found {kind!r}")
        self.stage(stage)
        self._mark_memory()
        self._open.append(_Open(stage, kind, time.perf_counter(), compile_totals()))
        try:
            yield
        finally:
            self._mark_memory()
            self._close(self._open.pop())

    def _close(self, s: _Open) -> None:
        elapsed = time.perf_counter() - s.start
        now = compile_totals()
        spent = _CompileTotals(now.seconds - s.compiles.seconds, now.compilations - s.compiles.compilations,
                               now.cache_hits - s.compiles.cache_hits)
        if self._open:  # the enclosing section does not count this one's time or compiles again
            parent = self._open[-1]
            parent.child_s += elapsed
            for f in ("seconds", "compilations", "cache_hits"):
                setattr(parent.child_compiles, f, getattr(parent.child_compiles, f) + getattr(spent, f))
        m = self.stages[s.stage]
        own = elapsed - s.child_s
        if s.kind == "run":
            m.run_s.append(own)
        else:
            setattr(m, f"{s.kind}_s", getattr(m, f"{s.kind}_s") + own)
        m.compile_s += spent.seconds - s.child_compiles.seconds
        m.compilations += spent.compilations - s.child_compiles.compilations
        m.cache_hits += spent.cache_hits - s.child_compiles.cache_hits

    def _mark_memory(self) -> None:
        """Credits the high-water marks since the last mark to every open section's stage, then restarts them."""
        host, device = host_peak_bytes(), device_peak_bytes()
        for stage in {s.stage for s in self._open}:
            m = self.stages[stage]
            m.peak_host_rss_bytes = max(m.peak_host_rss_bytes or 0, host)
            if device is not None:
                m.peak_device_bytes = max(m.peak_device_bytes or 0, device)
        reset_host_peak()

    def add_model(self, stage: str, weights, programs: dict | None = None,
                  compile_s: dict[str, float] | None = None) -> None:
        """Weight bytes of a loaded model, the temp bytes of the programs it ran and each one's compile seconds
        (`compiling`'s record; call after its runs)."""
        m = self.stage(stage)
        m.weights_bytes, m.weights_bytes_per_device = weights_bytes(weights)
        if programs:
            m.activation_bytes_per_device = temp_bytes(programs)
        if compile_s:
            m.program_compile_s = dict(compile_s)

    def add_swaps(self, stage: str, seconds: list[float]) -> None:
        """The expert swaps of a --expert_offload run (nothing without one)."""
        if seconds:
            m = self.stage(stage)
            m.expert_swaps = (m.expert_swaps or 0) + len(seconds)
            m.expert_swap_s = (m.expert_swap_s or 0.0) + sum(seconds)

    def add_cache(self, stage: str, batches: list[dict]) -> None:
        """A run's step-cache counts from each batch's step_cache.summary (nothing without a cache): counts summed
        over the batches, calibration ratios averaged over them."""
        if not batches:
            return
        m = self.stage(stage)
        m.block_stacks_run = {b: sum(s["ran"][b] for s in batches) for b in batches[0]["ran"]}
        m.block_stacks_computed = sum(s["computed"] for s in batches)
        if "mag_ratios" in batches[0]:
            m.mag_ratios = {b: [statistics.fmean(r) for r in zip(*(s["mag_ratios"][b] for s in batches))]
                            for b in batches[0]["mag_ratios"]}

    def add_steps(self, stage: str, seconds: list[float], steps_per_run: int) -> None:
        """Per-step wall times of the timed runs: s_per_step is their median."""
        m = self.stage(stage)
        self._step_seconds.setdefault(stage, []).extend(seconds)
        m.steps = steps_per_run
        m.s_per_step = statistics.median(self._step_seconds[stage]) if self._step_seconds[stage] else None


def metrics_dict(recorder: Recorder, *, script: str, config: dict, mesh, num_iterations: int,
                 total_s: float, time_to_first_step_s: float | None = None) -> dict:
    """The metrics.json document (schema in docs/FORMATS.md)."""
    import jax

    stages = {name: dataclasses.asdict(recorder.stages[name]) for name in STAGES if name in recorder.stages}
    peaks = lambda key: max((s[key] for s in stages.values() if s[key] is not None), default=None)  # noqa: E731
    return {
        "schema": artifacts.METRICS_SCHEMA,
        "script": script,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "device_memory_bytes": device_capacity_bytes(),
        "mesh": {"dp": mesh.shape["dp"], "tp": mesh.shape["tp"]},
        "config": config,
        "num_iterations": num_iterations,
        "total_s": total_s,
        "time_to_first_step_s": time_to_first_step_s,
        "peak_host_rss_bytes": peaks("peak_host_rss_bytes"),
        "peak_device_bytes": peaks("peak_device_bytes"),
        "stages": stages,
    }


def merge_stage(previous: dict | None, new: dict, stage: str) -> dict:
    """The staged path's metrics.json: one stage script's document merged over the folder's previous one.
    Earlier stages' entries are kept; later ones are dropped (they were computed from older inputs)."""
    stages = {}
    if previous and previous.get("script") == "stages":
        stages = {n: previous["stages"][n] for n in STAGES[: STAGES.index(stage)] if n in previous["stages"]}
    stages[stage] = new["stages"][stage]
    peaks = lambda key: max((s[key] for s in stages.values() if s[key] is not None), default=None)  # noqa: E731
    return {
        **new, "script": "stages", "stages": stages, "total_s": sum(s["wall_s"] or 0.0 for s in stages.values()),
        "peak_host_rss_bytes": peaks("peak_host_rss_bytes"), "peak_device_bytes": peaks("peak_device_bytes"),
    }


def save_stage_metrics(folder, rec: Recorder, stage: str, config: dict, mesh, start: float) -> dict:
    """A stage script's metrics (its wall clock counted from `start`) merged into <folder>/metrics.json
    (see merge_stage); returns the merged document."""
    rec.stage(stage).wall_s = time.perf_counter() - start
    new = metrics_dict(rec, script="stages", config=config, mesh=mesh, num_iterations=1,
                       total_s=rec.stage(stage).wall_s)
    path = Path(folder) / artifacts.METRICS_FILE
    try:
        previous = artifacts.load_metrics(path) if path.exists() else None
    except artifacts.ArtifactError:
        previous = None  # an unreadable or foreign file is replaced, not merged
    merged = merge_stage(previous, new, stage)
    artifacts.save_metrics(path, merged)
    return merged


def table(metrics: dict, only: str | None = None) -> str:
    """The per-stage table generate_flax.py prints (a stage script: `only` its own stage)."""
    head = ("stage", "load s", "warmup s", "compile s", "run s", "io s", "s/step", "weights/dev", "temp/dev",
            "peak dev", "peak host")
    rows = [head]
    for name, s in metrics["stages"].items():
        if only not in (None, name):
            continue
        run = statistics.median(s["run_s"]) if s["run_s"] else 0.0
        rows.append((name, f"{s['load_s']:.3f}", f"{s['warmup_s']:.3f}", f"{s['compile_s']:.3f}", f"{run:.3f}",
                     f"{s['io_s']:.3f}", "-" if s["s_per_step"] is None else f"{s['s_per_step']:.4f}",
                     human_bytes(s["weights_bytes_per_device"]), human_bytes(s["activation_bytes_per_device"]),
                     human_bytes(s["peak_device_bytes"]), human_bytes(s["peak_host_rss_bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    runs = metrics["num_iterations"]
    total = metrics["stages"][only]["wall_s"] if only else metrics["total_s"]
    lines.append(f"run s: median of {runs} timed run(s); compile s is included in load/warmup/run; "
                 f"total {total:.3f} s")
    return "\n".join(lines)
