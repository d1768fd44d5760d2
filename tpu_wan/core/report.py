"""A markdown report of a metrics.json from generate_flax.py or the stage scripts: time, memory, what to change
(or, for a compile-only run, what the TPU compiler said of each program).

python -m tpu_wan.core.report metrics.json [--device_memory_gib 32] [--output report.md]
(a pure reader: imports neither jax nor torch)
"""

from __future__ import annotations

import statistics
import sys
from typing import Sequence

from tpu_wan.core import entry
from tpu_wan.core.errors import UsageError

STAGE_ORDER = ("text_encoder", "transformer", "vae")
GiB, MiB, KiB = 2**30, 2**20, 2**10
# Plan to 85% of a device's memory: weights + the largest program's temporaries is not all XLA holds (inputs
# and outputs kept between programs, other programs' buffers, fragmentation, the runtime's own reservation).
FIT_FRACTION = 0.85
# Above this share of the wall clock spent compiling, a warm persistent cache would at least halve the next run.
COMPILE_DOMINANT = 0.5
MAX_TP = 64  # the largest tp the advice proposes


def load_metrics(path) -> dict:
    from tpu_wan.core.artifacts import load_metrics as load  # numpy and safetensors, no jax

    return load(path)


def human_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def secs(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _total(values):
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def ordered_stages(metrics: dict) -> dict:
    stages = metrics.get("stages") or {}
    names = [n for n in STAGE_ORDER if n in stages] + [n for n in stages if n not in STAGE_ORDER]
    return {n: stages[n] for n in names}


def run_section(m: dict) -> list[str]:
    c, mesh = m.get("config") or {}, m.get("mesh") or {}
    get = lambda d, k: "n/a" if d.get(k) is None else d[k]  # noqa: E731
    n_prompts, n_seeds = len(c.get("prompts") or []), len(c.get("seeds") or [])
    videos = f"{n_prompts} prompts x {n_seeds} seeds = {n_prompts * n_seeds}" if n_prompts and n_seeds else "n/a"
    return ["## Run", "", f"- script: {get(m, 'script')}",
            f"- devices: {get(m, 'backend')}, {get(m, 'device_kind')} x {get(m, 'device_count')}, processes: "
            f"{get(m, 'process_count')}", f"- mesh: dp {get(mesh, 'dp')} x tp {get(mesh, 'tp')}",
            f"- model: {get(c, 'model_id')}", f"- size: {get(c, 'width')}x{get(c, 'height')}x{get(c, 'frames')} "
            f"(WxHxF), {get(c, 'num_inference_steps')} steps, batch size {get(c, 'batch_size')}",
            f"- videos: {videos}", f"- dtypes: transformer {get(c, 'dtype')}, text {get(c, 'text_dtype')}, "
            f"vae {get(c, 'vae_dtype')}", *experts_lines(m), f"- created: {get(m, 'created')}"]


def experts_lines(m: dict) -> list[str]:
    """A two-expert run's experts (which ran how many steps, at which guidance) and its swaps, if any."""
    c = m.get("config") or {}
    steps = c.get("expert_steps")
    if not steps:
        return []
    first = steps.count(steps[0])
    lines = [f"- experts: {steps[0]} for {first} steps (guidance {c.get('guidance_scale')}), then {steps[-1]} for "
             f"{len(steps) - first} (guidance {c.get('guidance_scale_2')}); boundary ratio {c.get('boundary_ratio')}"]
    transformer = (m.get("stages") or {}).get("transformer") or {}
    if transformer.get("expert_swaps"):
        lines.append(f"- expert offload: {transformer['expert_swaps']} swaps, {secs(transformer['expert_swap_s'])} s")
    return lines


def time_section(m: dict) -> list[str]:
    rows = {}
    for name, s in ordered_stages(m).items():
        runs = s.get("run_s") or []
        rows[name] = [s.get("load_s"), s.get("warmup_s"), s.get("compile_s"), len(runs),
                      statistics.median(runs) if runs else None, sum(runs) if runs else None, s.get("io_s"),
                      s.get("s_per_step")]
    load, warmup, compile_s, _, _, run, io, _ = total = [_total(col) for col in zip(*rows.values())] or [None] * 8
    lines = ["## Time per stage", "", "| stage | load (s) | warmup (s) | of which compile (s) | runs | run median (s) "
             "| run total (s) | io (s) | s/step |", "|---|" + "---:|" * 8]
    lines += [_row([n] + [v if i == 3 else secs(v) for i, v in enumerate(r)]) for n, r in rows.items()]
    lines.append(_row(["**total**"] + [secs(v) if i in (0, 1, 2, 5, 6) else "" for i, v in enumerate(total)]))
    staged, total_s = _total([load, warmup, run, io]), m.get("total_s")
    line = (f"Stages: load {secs(load)} + warmup {secs(warmup)} + run {secs(run)} + io {secs(io)} = {secs(staged)} s "
            f"of {secs(total_s)} s total")
    if staged is not None and total_s:
        line += f"; {total_s - staged:.2f} s ({(total_s - staged) / total_s:.1%}) outside them (imports, device setup)"
    return lines + ["", line + "."]


def memory_section(m: dict, capacity: int | None) -> list[str]:
    keys = ("weights_bytes", "weights_bytes_per_device", "activation_bytes_per_device", "peak_device_bytes",
            "peak_host_rss_bytes")
    lines = ["## Memory per component", "", "| stage | weights total | weights / device | activations / device "
             "| peak device | peak host RSS |", "|---|" + "---:|" * 5]
    lines += [_row([n] + [human_bytes(s.get(k)) for k in keys]) for n, s in ordered_stages(m).items()]
    peak = m.get("peak_device_bytes")
    share = f" ({peak / capacity:.0%} of {human_bytes(capacity)})" if peak is not None and capacity else ""
    return lines + ["", f"Peak: {human_bytes(peak)} per device{share}, host RSS "
                        f"{human_bytes(m.get('peak_host_rss_bytes'))}."]


def held_weights(m: dict, name: str, sharded_only: bool = False) -> int:
    """Weights per device held while `name` runs: its own, or every stage's in generate_flax.py (one process);
    with `sharded_only`, those that tp divides (all but the replicated VAE)."""
    stages = ordered_stages(m)
    held = stages if m.get("script") == "generate_flax.py" else {name: stages[name]}
    return sum(s.get("weights_bytes_per_device") or 0 for n, s in held.items() if not sharded_only or n != "vae")


def needs_per_device(m: dict) -> dict[str, int]:
    """Weights + activations per device of each stage."""
    return {n: held_weights(m, n) + (s.get("activation_bytes_per_device") or 0) for n, s in ordered_stages(m).items()}


def tp_that_fits(weights_per_device: int, rest: int, tp: int, budget: float) -> int | None:
    """Smallest power-of-two tp above `tp` with weights_per_device * tp / new_tp + rest <= budget."""
    return next((2**k for k in range(MAX_TP.bit_length()) if 2**k > tp
                 and weights_per_device * tp / 2**k + rest <= budget), None)


def stage_advice(m: dict, name: str, need: int, capacity: int) -> list[str]:
    s, c, budget = ordered_stages(m)[name], m.get("config") or {}, FIT_FRACTION * capacity
    weights, act = s.get("weights_bytes_per_device") or 0, s.get("activation_bytes_per_device") or 0
    tips = []
    tp, devices = (m.get("mesh") or {}).get("tp") or 1, m.get("device_count") or 1
    sharded = held_weights(m, name, sharded_only=True)  # 0 for the VAE alone: nothing for tp to divide
    fit = tp_that_fits(sharded, need - sharded, tp, budget) if sharded else None
    if sharded and fit is None:
        tips.append(f"no tp up to {MAX_TP} fits: {human_bytes(need - sharded)} of the need does not shrink with tp")
    elif fit:
        more = f" (more than the {devices} devices of this run)" if fit > devices else ""
        tips.append(f"raise --tp from {tp} to {fit}{more}: weights per device {human_bytes(sharded)} -> "
                    f"{human_bytes(sharded * tp // fit)}, need {human_bytes(sharded * tp // fit + need - sharded)}")
    if name in ("transformer", "text_encoder"):
        if c.get("text_dtype" if name == "text_encoder" else "dtype") == "float32":
            tips.append(f"--dtype bfloat16{' in stage 1' if name == 'text_encoder' else ''} halves its weights "
                        f"({human_bytes(weights)} -> {human_bytes(weights // 2)})")
    if name == "vae" and c.get("vae_dtype") == "float32":
        tips.append(f"--vae_dtype bfloat16 halves its activations ({human_bytes(act)} -> {human_bytes(act // 2)})")
    if name == "vae":
        tips.append("run on more devices: the decode splits width over all of them, so activations per device "
                    "shrink with the device count")
    if name in ("transformer", "vae") and act:
        tips.append(f"fewer --frames or a smaller --batch_size shrink its activations ({human_bytes(act)} per device)")
    if m.get("script") == "generate_flax.py" and weights + act <= budget:
        tips.append(f"run the three stage scripts instead of generate_flax.py: each holds only its own weights "
                    f"(need {human_bytes(weights + act)})")
    return [f"- {name} needs {human_bytes(need)} per device, above {FIT_FRACTION:.0%} of "
            f"{human_bytes(capacity)} ({human_bytes(int(budget))}):"] + [f"  - {t}" for t in tips]


def advice_section(m: dict, capacity: int | None, from_flag: bool) -> list[str]:
    needs, lines = needs_per_device(m), []
    if capacity is None:
        lines.append("- The backend reports no device capacity (CPU): pass --device_memory_gib to plan for a "
                     "target (e.g. 32 for v6e, 16 for v5e, 95 for v5p).")
    else:
        source = "--device_memory_gib" if from_flag else "as the backend reports it"
        lines.append(f"- Capacity {human_bytes(capacity)} per device ({source}); planning to {FIT_FRACTION:.0%} of "
                     f"it, {human_bytes(int(FIT_FRACTION * capacity))}.")
    held = " (generate_flax.py holds every stage's weights at once)" if m.get("script") == "generate_flax.py" else ""
    lines.append("- Per-device need, weights + activations" + held + ": "
                 + ", ".join(f"{n} {human_bytes(b)}" for n, b in needs.items()) + ".")
    if capacity is not None and needs:
        budget = FIT_FRACTION * capacity
        for name in [n for n, b in needs.items() if b > budget]:
            lines += stage_advice(m, name, needs[name], capacity)
        if all(b <= budget for b in needs.values()):
            name = max(needs, key=needs.get)
            lines.append(f"- All stages fit: the tightest, {name}, needs {needs[name] / capacity:.0%} of the "
                         f"device, {human_bytes(capacity - needs[name])} of headroom.")
    stages = ordered_stages(m).values()
    compile_s, total = _total(s.get("compile_s") for s in stages), m.get("total_s")
    if compile_s and total and compile_s > COMPILE_DOMINANT * total and not _total(s.get("cache_hits") for s in stages):
        lines.append(f"- Compilation took {compile_s:.2f} s of the {total:.2f} s total ({compile_s / total:.0%}) with "
                     "no cache hits: keep the persistent compilation cache on (--compilation_cache_dir DIR) so "
                     "the next run loads its programs instead of compiling them.")
    return ["## What to change", ""] + lines


def compiled_section(m: dict) -> list[str]:
    """A compile-only document (tpu_wan.run.aot): each program's numbers as the TPU compiler gave them."""
    t, mesh, c = m["target"], m.get("mesh") or {}, m.get("config") or {}
    lines = ["## Compiled for " + t["topology"], "",
             f"- target: {t['devices']} x {t['device_kind']} on {t['hosts']} host(s)"
             + (" (a multi-host slice: run with --distributed on every host)" if t["hosts"] > 1 else "") + ", "
             f"{human_bytes(t['hbm_bytes_per_device'])} HBM per device, {human_bytes(m['usable_bytes_per_device'])} "
             "for one program (the TPU compiler's limit)",
             f"- mesh: dp {mesh.get('dp')} x tp {mesh.get('tp')}; model {c.get('model_id')}, "
             f"{c.get('width')}x{c.get('height')}x{c.get('frames')} (WxHxF), batch size {c.get('batch_size')}, "
             f"dtype {c.get('dtype')}" + (f", DiT sharding {c['sharding']}" if c.get("sharding") else "")
             + ("; one process (generate_flax.py)" if m.get("one_process") else ""),
             "", "| stage | program | compile (s) | arguments | temp | peak / device | fits | FLOPs / device "
             "| model FLOPs / device | collective bytes | bytes sent / device | custom calls |", "|---|---|" + "---:|" * 10]
    for name, s in ordered_stages(m).items():
        for p in s["compiled"]:
            moved = sum(v["bytes"] for v in p["collectives"].values())
            sent = sum(v.get("traffic_bytes", 0) for v in p["collectives"].values())
            calls = ", ".join(f"{k} x{v}" for k, v in p["custom_calls"].items()) or "-"
            flops = lambda x: "n/a" if x is None else f"{x:.3e}"  # noqa: E731
            lines.append(_row([name, p["name"], secs(p["compile_s"]), human_bytes(p["argument_bytes"]),
                               human_bytes(p["temp_bytes"]), human_bytes(p["peak_bytes"]),
                               "yes" if p["fits"] else "**no**", flops(p["flops"]), flops(p["ideal_flops"]),
                               "n/a" if p.get("skipped") else human_bytes(moved),
                               "n/a" if p.get("skipped") else human_bytes(sent), calls]))
    for row in m.get("mesh_search", []):
        moved, sent = row["step_collective_bytes"], row.get("step_traffic_bytes")
        lines.append(f"- mesh dp {row['dp']} x tp {row['tp']}"
                     + (f", sharding {row['sharding']}" if row.get("sharding") else "")
                     + f": fits {'yes' if row['fits'] else 'no'}, "
                     + ("step not compiled" if moved is None else f"{human_bytes(moved)} moved per device per step"
                        + (f" ({human_bytes(sent)} sent)" if sent is not None else ""))
                     + f", peak {human_bytes(row['peak_bytes'])}")
    verdict = "everything fits" if m["fits"] else "something does not fit (see **no** above)"
    return lines + ["", f"Verdict: {verdict}. These are the compiler's estimates for one call of each program, "
                        "not measurements."]


def render(metrics: dict, device_memory_gib: float | None = None, title: str = "metrics.json") -> str:
    if "target" in metrics:  # a compile-only run: nothing ran, so no time or measured memory to report
        return "\n\n".join([f"# Wan compile report: {title}", "\n".join(compiled_section(metrics))]) + "\n"
    capacity = int(device_memory_gib * GiB) if device_memory_gib else metrics.get("device_memory_bytes")
    sections = [run_section(metrics), time_section(metrics), memory_section(metrics, capacity),
                advice_section(metrics, capacity, from_flag=bool(device_memory_gib))]
    return "\n\n".join([f"# Wan run report: {title}"] + ["\n".join(s) for s in sections]) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = entry.make_parser(__doc__)
    parser.add_argument("metrics", help="metrics.json from generate_flax.py or the stage scripts")
    parser.add_argument("--device_memory_gib", type=float, default=None,
                        help="plan for this much memory per device (default: what the backend reported)")
    parser.add_argument("--output", default=None, help="write the report here (default: stdout)")
    args = parser.parse_args(argv)
    if args.device_memory_gib is not None and args.device_memory_gib <= 0:
        raise UsageError(f"--device_memory_gib must be > 0, found {args.device_memory_gib}")
    text = render(load_metrics(args.metrics), args.device_memory_gib, title=args.metrics)
    if args.output is None:
        sys.stdout.write(text)
    else:
        from tpu_wan.core.artifacts import atomic_write

        atomic_write(args.output, lambda tmp: tmp.write_text(text, encoding="utf-8"))


if __name__ == "__main__":
    sys.exit(entry.run_main(main))
