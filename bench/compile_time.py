"""python bench/compile_time.py [--cases 14b-720p 1.3b-480p] [--tree DIR --label before] [--out DIR]
       [--from_dir DIR] [--write] [--smoke]

How long the TPU compiler (libtpu, deviceless, on this CPU) takes for every program of a run, stage by stage:
`generate_flax.py --compile_only --topology T --compile_stages STAGE` as its own process per stage, one stage after
the other (one compile at a time: nothing else shares the cores), the default mesh, one prompt, CFG, the model's
frames, bfloat16 DiT and float32 VAE as a run uses them. Each program's compile seconds, the compiler's FLOPs and
temporaries come from the run's metrics.json.

`--tree DIR` runs another checkout's generate_flax.py (e.g. a git worktree at an older commit) and `--label`
names its column, so one table shows before and after from the same machine: run the bench once per tree into
the same --out, then `--from_dir DIR --write` renders bench/README.md's `compile_time` block (first label as the
baseline). --smoke: the tiny model on v6e-1, text encoder and DiT; the last line is `programs N compile_s S`.
Compiler seconds on this CPU, not a TPU host's; no program runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from doc_tables import markdown_table, measured_line, stamp, write_block  # noqa: E402

STAGES = ("text_encoder", "transformer", "vae")
WAN21 = "Wan-AI/Wan2.1-T2V-"
# case -> (model id, height, width, frames, topology)
CASES = {
    "1.3b-480p": (WAN21 + "1.3B-Diffusers", 480, 832, 81, "v6e-4"),
    "14b-720p": (WAN21 + "14B-Diffusers", 720, 1280, 81, "v6e-8"),
}
SMOKE = {"tiny": ("tiny-random", 64, 96, 9, "v6e-1")}
# The tiny VAE's decode compiles in ~11 s more (a process of its own); tests/test_compile_only.py compiles it.
SMOKE_STAGES = ("text_encoder", "transformer")
GiB = 1 << 30


def compile_stage(tree: Path, case: str, stage: str, folder: Path, label: str, spec) -> dict:
    model_id, height, width, frames, topology = spec
    metrics = folder / f"{label}_{case}_{stage}.json"
    cmd = [sys.executable, str(tree / "generate_flax.py"), "--model_id", model_id, "--height", str(height),
           "--width", str(width), "--frames", str(frames), "--topology", topology, "--compile_only",
           "--compile_stages", stage, "--metrics", str(metrics)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree)
    if proc.returncode not in (0, 3):  # 3: a program does not fit, still compiled
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    document = json.loads(metrics.read_text())
    compiled = document["stages"][stage]["compiled"]
    kept = {"case": case, "stage": stage, "label": label, "topology": topology, "wall_s": time.perf_counter() - start,
            "mesh": document["mesh"], "programs": [{k: p.get(k) for k in ("name", "compile_s", "flops", "temp_bytes")}
                                                   for p in compiled],
            "measured_at": {**stamp(), "commit": _commit(tree)}}
    metrics.write_text(json.dumps(kept, indent=1))
    return kept


def _commit(tree: Path) -> str:
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=tree).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)*.md")
    return (git("rev-parse", "--short=10", "HEAD") or "unknown") + (" with uncommitted changes" if dirty else "")


def table(documents: list[dict]) -> str:
    """One row per (case, program): compile seconds per label, the last label over the first, and the last
    label's FLOPs and temporaries over the first's (the same program must compute the same); a row per stage whose
    programs changed (_stage_rows); a total per case of the stages every label compiled."""
    labels = list(dict.fromkeys(d["label"] for d in documents))
    cells: dict[tuple, dict[str, dict]] = {}
    for d in documents:
        for p in d["programs"]:
            cells.setdefault((d["case"], d["topology"], d["stage"], p["name"]), {})[d["label"]] = p
    head = ["case", "slice", "stage", "program", *(f"{label} s" for label in labels)]
    if len(labels) > 1:
        head += [f"{labels[0]} / {labels[-1]}", "FLOPs ratio", "temp GiB (ratio)"]
    rows, totals = [], {}
    for (case, topology, stage, name), by_label in cells.items():
        row = [case, topology, stage, name]
        seconds = [(by_label.get(label) or {}).get("compile_s") for label in labels]
        row += ["" if s is None else f"{s:.1f}" for s in seconds]
        first, last = by_label.get(labels[0]), by_label.get(labels[-1])
        if len(labels) > 1:
            if first and last and first["compile_s"] and last["compile_s"]:
                row.append(f"{first['compile_s'] / last['compile_s']:.1f}x")
                row.append(_ratio(last["flops"], first["flops"], "{:.3f}"))
                temp = _ratio(last["temp_bytes"], first["temp_bytes"], "{:.2f}")
                row.append(f"{last['temp_bytes'] / GiB:.2f} ({temp})")
            else:
                row += ["", "", ""]
        rows.append(row)
    rows += _stage_rows(documents, labels)
    compiled = {}  # (case, topology, stage) -> label -> seconds of all its programs
    for d in documents:
        stage = compiled.setdefault((d["case"], d["topology"], d["stage"]), {})
        stage[d["label"]] = stage.get(d["label"], 0.0) + sum(p["compile_s"] or 0.0 for p in d["programs"])
    for (case, topology, _), by_label in compiled.items():
        if all(label in by_label for label in labels):  # totals compare stages compiled under every label only
            for label in labels:
                totals.setdefault((case, topology), {}).setdefault(label, 0.0)
                totals[(case, topology)][label] += by_label[label]
    for (case, topology), by_label in totals.items():
        row = [case, topology, "timed in all", "**total**",
               *(f"**{by_label.get(label, 0.0):.0f}**" for label in labels)]
        if len(labels) > 1:
            row += [f"{by_label[labels[0]] / max(by_label[labels[-1]], 1e-9):.1f}x", "", ""]
        rows.append(row)
    return markdown_table(head, rows)


def _stage_rows(documents: list[dict], labels: list[str]) -> list[list[str]]:
    """A row per stage whose programs differ between the labels (the VAE's two programs became one), compiled under
    every label: compile seconds summed, FLOPs summed and the largest temporaries, last label over the first."""
    stages: dict[tuple, dict[str, list]] = {}
    for d in documents:
        stages.setdefault((d["case"], d["topology"], d["stage"]), {}).setdefault(d["label"], []).extend(d["programs"])
    rows = []
    for (case, topology, stage), by_label in stages.items():
        names = {label: sorted(p["name"] for p in by_label.get(label, [])) for label in labels}
        changed = len(set(map(tuple, names.values()))) > 1
        if len(labels) < 2 or not changed or any(label not in by_label for label in labels):
            continue
        seconds = [sum(p["compile_s"] or 0.0 for p in by_label[label]) for label in labels]
        flops = [sum(p["flops"] or 0.0 for p in by_label[label]) for label in labels]
        temp = [max(p["temp_bytes"] or 0 for p in by_label[label]) for label in labels]
        rows.append([case, topology, stage, "**all programs**", *(f"**{s:.1f}**" for s in seconds),
                     f"{seconds[0] / max(seconds[-1], 1e-9):.1f}x", _ratio(flops[-1], flops[0], "{:.3f}"),
                     f"{temp[-1] / GiB:.2f} ({_ratio(temp[-1], temp[0], '{:.2f}')})"])
    return rows


def _ratio(a, b, fmt: str) -> str:
    return fmt.format(a / b) if a and b else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose generate_flax.py compiles")
    parser.add_argument("--label", default="now", help="this tree's column in the table")
    parser.add_argument("--out", type=Path, help="keep each stage's numbers here (default: a temporary folder)")
    parser.add_argument("--from_dir", type=Path, help="render the numbers kept in DIR without compiling")
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on v6e-1")
    args = parser.parse_args()

    if args.from_dir:
        documents = [json.loads(p.read_text()) for p in sorted(args.from_dir.glob("*.json"))]
        documents.sort(key=lambda d: (d["measured_at"]["date"], d["label"] != "before"))
    else:
        folder = args.out or Path(tempfile.mkdtemp(prefix="compile_time_"))
        folder.mkdir(parents=True, exist_ok=True)
        cases = SMOKE if args.smoke else {c: CASES[c] for c in args.cases}
        stages = SMOKE_STAGES if args.smoke else args.stages
        documents = []
        for case, spec in cases.items():
            for stage in stages:
                documents.append(compile_stage(args.tree.resolve(), case, stage, folder, args.label, spec))
                print(f"{case} {stage}: " + ", ".join(f"{p['name']} {p['compile_s']:.1f} s"
                                                       for p in documents[-1]["programs"]), flush=True)
    text = table(documents)
    print(text)
    if args.write and not args.smoke:
        write_block("compile_time", text, measured_line(documents))
    programs = [p for d in documents for p in d["programs"]]
    print(f"programs {len(programs)} compile_s {sum(p['compile_s'] or 0.0 for p in programs):.1f}")


if __name__ == "__main__":
    main()
