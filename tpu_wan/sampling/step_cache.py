"""Step caches for full-step runs, as diffusers' hooks define them, inside the one compiled denoising step.

  first_block:THRESHOLD   First Block Cache (diffusers.hooks.apply_first_block_cache): block 0 always runs; its
                          residual r = out0 - in0 is compared with the one kept from the last step that ran the
                          rest, mean|r - r_prev| / mean|r_prev| (over that branch's whole batch, in the model dtype);
                          at or below THRESHOLD the other blocks are skipped and their output is out0 plus the tail
                          residual (last block's output - out0) kept from that step.
  mag:THRESHOLD:RATIOS[:MAX_SKIP_STEPS[:RETENTION_RATIO]]
                          MagCache (diffusers.hooks.apply_mag_cache): a fixed schedule from the model's magnitude
                          ratios (one per step, nearest-interpolated to the step count as diffusers does); after the
                          first RETENTION_RATIO (default 0.2) of the steps, the product of the ratios since the last
                          full step accumulates |1 - product| as an error, and a step skips every block (output =
                          input + the whole stack's residual from the last full step) while that error stays
                          <= THRESHOLD and at most MAX_SKIP_STEPS (default 3) steps in a row.
  mag:calibrate           no skips; records each step's ratio mean(|r_t| / (|r_t-1| + 1e-8)) over the tokens of the
                          whole stack's residual r (norms over E), per branch: the RATIOS to pass (metrics.json).

diffusers calls the transformer once per branch (cache contexts "cond" and "uncond"), each with its own state and
decision; our step runs both branches as one [2B] batch, so the state holds each branch's rows and the decisions
are per branch, each a global mean over its rows (on a sharded mesh too). The blocks run under one `jax.lax.cond`
when any branch needs them, and each branch then takes the computed or the cached output: the same ops and
dtypes as the hooks. The state is reset per batch, as diffusers resets it per pipeline call. MagCache's schedule
depends on the step index only, so it is computed on the host (float32, as diffusers' accumulators) and carried
in the state; First Block Cache decides on device.

The torch side: tpu_wan.runtime.torchax_env.functionalize(stacks={"blocks": run_stack}) makes the DiT's block loop
call `run_stack` once; `cached_step` hands it the state through a context variable while the step is traced.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tpu_wan.core.config import DISTILL_SOLVERS
from tpu_wan.core.errors import ConfigError

KINDS = ("first_block", "mag")
BRANCHES = ("cond", "uncond")  # the row groups of a guided step, in _denoise_step's order
SYNTAX = "first_block:THRESHOLD, mag:THRESHOLD:RATIOS[:MAX_SKIP_STEPS[:RETENTION_RATIO]] or mag:calibrate"
_F = np.float32


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """A parsed --cache value (defaults as diffusers' FirstBlockCacheConfig / MagCacheConfig)."""

    kind: str
    threshold: float = 0.0
    mag_ratios: tuple[float, ...] | None = None  # mag: one per step of the calibration run
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    calibrate: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"--cache: expected a kind in {KINDS}, found {self.kind!r}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ConfigError(f"--cache {self.kind}: expected a threshold >= 0, found {self.threshold}")
        if self.kind == "mag" and not self.calibrate:
            if not self.mag_ratios:
                raise ConfigError("--cache mag: expected the model's magnitude ratios (mag:THRESHOLD:R1,R2,...; "
                                  "measure them once with --cache mag:calibrate), found none")
            bad = [r for r in self.mag_ratios if not (math.isfinite(r) and r > 0)]
            if bad:
                raise ConfigError(f"--cache mag: expected finite ratios > 0, found {bad[0]}")
        if self.max_skip_steps < 1:
            raise ConfigError(f"--cache mag: expected MAX_SKIP_STEPS >= 1, found {self.max_skip_steps}")
        if not 0 <= self.retention_ratio <= 1:
            raise ConfigError(f"--cache mag: expected RETENTION_RATIO in [0, 1], found {self.retention_ratio}")

    def __str__(self) -> str:
        """The canonical --cache text (what the config records)."""
        if self.kind == "first_block":
            return f"first_block:{self.threshold!r}"
        if self.calibrate:
            return "mag:calibrate"
        ratios = ",".join(repr(r) for r in self.mag_ratios)
        return f"mag:{self.threshold!r}:{ratios}:{self.max_skip_steps}:{self.retention_ratio!r}"


def parse(text: str) -> CacheSpec:
    """A --cache value -> CacheSpec; ConfigError naming the syntax and what was found."""
    kind, *values = text.split(":")
    fields = None
    try:  # the numbers; CacheSpec then checks their ranges
        if kind == "first_block" and len(values) == 1:
            fields = dict(threshold=float(values[0]))
        elif kind == "mag" and values == ["calibrate"]:
            fields = dict(calibrate=True)
        elif kind == "mag" and 1 <= len(values) <= 4:
            fields = dict(threshold=float(values[0]))
            converters = (("mag_ratios", lambda v: tuple(float(r) for r in v.split(","))), ("max_skip_steps", int),
                          ("retention_ratio", float))
            fields.update((name, convert(v)) for (name, convert), v in zip(converters, values[1:]))
    except ValueError:
        fields = None
    if fields is None:
        raise ConfigError(f"--cache: expected {SYNTAX}, found {text!r}")
    return CacheSpec(kind, **fields)


def check(text: str | None, solver: str, experts: tuple[str, ...]) -> str | None:
    """The canonical --cache text for a run with `solver` and `experts`; refuses what the caches do not serve."""
    if text is None:
        return None
    spec = parse(text)
    if solver in DISTILL_SOLVERS:
        raise ConfigError(f"--cache: expected a full-step solver (caches skip steps of long schedules), found "
                          f"--sample_solver {solver}")
    if len(experts) > 1:
        raise ConfigError(f"--cache: expected a model with one transformer, found two experts ({', '.join(experts)})")
    return str(spec)


def nearest_interp(ratios, length: int) -> np.ndarray:
    """diffusers' mag_cache.nearest_interp on float32 values: `ratios` stretched or squeezed to `length` steps."""
    src = np.asarray(ratios, _F)
    if length == 1:
        return src[-1:]
    scale = _F((len(src) - 1) / (length - 1))  # torch multiplies a float32 grid by the Python scale in float32
    return src[np.round(np.arange(length, dtype=_F) * scale).astype(np.int64)]


def mag_schedule(spec: CacheSpec, num_steps: int) -> np.ndarray:
    """[num_steps] bool: the steps MagCache runs the blocks at (diffusers' MagCacheHeadHook, its float32
    accumulators and its float32 comparison with the threshold), for a run of `num_steps` steps."""
    if spec.calibrate:
        return np.ones(num_steps, bool)
    ratios = np.asarray(spec.mag_ratios, _F)
    if len(ratios) != num_steps:
        ratios = nearest_interp(ratios, num_steps)
    retention = int(spec.retention_ratio * num_steps + 0.5)
    threshold = _F(spec.threshold)
    compute = np.ones(num_steps, bool)
    ratio, err, skipped = _F(1), _F(0), 0
    for i in range(retention, num_steps):
        ratio = _F(ratio * (ratios[i] if i < len(ratios) else _F(1)))
        err = _F(err + _F(abs(_F(1) - ratio)))
        skipped += 1
        if i > 0 and err <= threshold and skipped <= spec.max_skip_steps:  # step 0 holds no residual yet
            compute[i] = False
        else:
            ratio, err, skipped = _F(1), _F(0), 0
    return compute


def _threshold_below(threshold: float) -> np.float32:
    """The float32 t with (d > t) == (float(d) > threshold) for every float32 d, as diffusers compares `.item()`."""
    t = _F(threshold)
    return np.nextafter(t, _F(-np.inf)) if float(t) > threshold else t


@struct.dataclass
class FirstBlockState:
    head_residual: jax.Array  # [R L E] model dtype: each branch's block-0 residual at its last step that ran the tail
    tail_residual: jax.Array  # [R L E]: each branch's (last block's output - block 0's output) at that step
    step: jax.Array  # int32: the index of the step about to run
    log: jax.Array  # [K branches] bool: the steps each branch ran the tail blocks at


@struct.dataclass
class MagState:
    residual: jax.Array  # [R L E] model dtype: last block's output - block 0's input at the last full step
    schedule: jax.Array  # [K] bool: mag_schedule
    step: jax.Array  # int32: the index of the step about to run
    log: jax.Array  # [K branches] bool: the steps each branch ran the blocks at
    ratios: jax.Array  # [K branches] float32 with calibrate (else [0 branches]): each step's magnitude ratio


def abstract_state(spec: CacheSpec, branches: int, hidden_shape: tuple[int, int, int], dtype, num_steps: int,
                   hidden_sharding, replicated):
    """The state's shapes, dtypes and placements for a batch of `num_steps` steps: hidden [R L E] (R = branches x B
    rows) of the model `dtype`, placed with `hidden_sharding` (the blocks' layout); the rest `replicated`."""
    def shaped(shape, dt, sharding=replicated):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dt), sharding=sharding)

    hidden = shaped(hidden_shape, dtype, hidden_sharding)
    step, log = shaped((), jnp.int32), shaped((num_steps, branches), bool)
    if spec.kind == "first_block":
        return FirstBlockState(hidden, hidden, step, log)
    ratios = shaped((num_steps if spec.calibrate else 0, branches), jnp.float32)
    return MagState(hidden, shaped((num_steps,), bool), step, log, ratios)


def init_state(spec: CacheSpec, abstract):
    """A fresh state for one batch (diffusers resets its hooks per pipeline call): zeros of `abstract`'s shapes and
    placements, MagCache's schedule filled in."""
    state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding), abstract)
    if spec.kind == "mag":
        schedule = mag_schedule(spec, abstract.schedule.shape[0])
        state = state.replace(schedule=jax.device_put(schedule, abstract.schedule.sharding))
    return state


def summary(spec: CacheSpec, state, to_host: Callable = np.asarray) -> dict[str, Any]:
    """What a finished batch ran, from its state (only its small arrays go `to_host`): per branch, the steps that
    ran the block stack ("pattern") and their count ("ran"); the steps whose program ran it for some branch
    ("computed"); with calibrate, each branch's ratios ("mag_ratios")."""
    log = to_host(state.log)[: int(to_host(state.step))]  # [steps run, branches]
    names = BRANCHES[: log.shape[1]]
    out = {"pattern": {b: [bool(x) for x in log[:, i]] for i, b in enumerate(names)},
           "ran": {b: int(log[:, i].sum()) for i, b in enumerate(names)}, "computed": int(log.any(axis=1).sum())}
    if spec.calibrate:
        ratios = to_host(state.ratios)[: len(log)]
        out["mag_ratios"] = {b: [float(r) for r in ratios[:, i]] for i, b in enumerate(names)}
    return out


def _per_branch(x: jax.Array, branches: int) -> jax.Array:
    return x.reshape(branches, x.shape[0] // branches, *x.shape[1:])  # [R L E] -> [branches B L E]


def _absmean(x: jax.Array) -> jax.Array:
    """[branches B L E] -> [branches]: torch's x.abs().mean() per branch (float32 sums, the result in x's dtype)."""
    return jnp.mean(jnp.abs(x), axis=(1, 2, 3), dtype=jnp.float32).astype(x.dtype)


def _first_block(spec: CacheSpec, state: FirstBlockState, hidden, run):
    branches = state.log.shape[1]
    head = run(hidden, 0, 1)  # [R L E]: block 0 always runs
    residual = head - hidden
    previous = _per_branch(state.head_residual, branches)
    diff = _absmean(_per_branch(residual, branches) - previous) / _absmean(previous)  # [branches], model dtype
    # step 0 holds no residual; a mean over every row of a branch is the same on every device
    compute = (state.step == 0) | (diff.astype(jnp.float32) > _threshold_below(spec.threshold))
    tail = jax.lax.cond(jnp.any(compute), lambda h: run(h, 1, None), lambda h: h, head)
    rows = jnp.repeat(compute, hidden.shape[0] // branches)[:, None, None]  # [R 1 1]
    out = jnp.where(rows, tail, state.tail_residual + head)
    return out, FirstBlockState(head_residual=jnp.where(rows, residual, state.head_residual),
                                tail_residual=jnp.where(rows, tail - head, state.tail_residual),
                                step=state.step + 1, log=state.log.at[state.step].set(compute))


def _magnitude_ratio(current: jax.Array, previous: jax.Array) -> jax.Array:
    """[branches B L E] x 2 -> [branches]: mean over B, L of |current| / (|previous| + 1e-8), norms over E in f32."""
    norm = lambda x: jnp.linalg.norm(x.astype(jnp.float32), axis=-1)  # noqa: E731
    return jnp.mean(norm(current) / (norm(previous) + 1e-8), axis=(1, 2))


def _mag(spec: CacheSpec, state: MagState, hidden, run):
    branches = state.log.shape[1]
    compute = state.schedule[state.step]  # the same for every branch: a schedule of the step index

    def full(h):
        out = run(h, 0, None)
        return out, out - h

    out, residual = jax.lax.cond(compute, full, lambda h: (h + state.residual, state.residual), hidden)
    ratios = state.ratios
    if spec.calibrate:  # every step is full; step 0 has no previous residual and logs 1.0
        ratio = _magnitude_ratio(_per_branch(residual, branches), _per_branch(state.residual, branches))
        ratios = ratios.at[state.step].set(jnp.where(state.step == 0, 1.0, ratio))
    return out, MagState(residual=residual, schedule=state.schedule, step=state.step + 1,
                         log=state.log.at[state.step].set(jnp.broadcast_to(compute, (branches,))), ratios=ratios)


@dataclasses.dataclass
class _Slot:
    spec: CacheSpec
    state: Any


_slot: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("step_cache", default=None)


def run_stack(hidden: jax.Array, run: Callable) -> jax.Array:
    """The DiT's block loop (torchax_env.StackFn): under `cached_step`, the cache's; elsewhere every block."""
    slot = _slot.get()
    if slot is None:
        return run(hidden, 0, None)
    stack = _first_block if slot.spec.kind == "first_block" else _mag
    out, slot.state = stack(slot.spec, slot.state, hidden, run)
    return out


def cached_step(step: Callable, spec: CacheSpec, *args):
    """step(*args[:-1]) with args[-1], the cache state, threaded through the transformer's block loop (whose forward
    was built with stacks={"blocks": run_stack}) -> (*step's outputs, the new cache state)."""
    *args, state = args
    slot = _Slot(spec, state)
    token = _slot.set(slot)
    try:
        out = step(*args)
    finally:
        _slot.reset(token)
    if slot.state is state:
        raise RuntimeError("the step's transformer never ran its block loop through step_cache.run_stack")
    return (*out, slot.state)
