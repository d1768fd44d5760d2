"""python bench/memory_per_program.py [--smoke] [--runs a14b-720p-v6e-8 ...] [--out DIR] [--from_dir DIR] [--write]

Per program, what the TPU compiler says one chip holds for a whole run in one process (generate_flax.py: UMT5,
the DiT (both experts of a two-expert model) and the VAE resident), compiled on this CPU host (libtpu, deviceless:
nothing runs, no weights are read). Each run is `generate_flax.py --compile_only --topology T` at the model's
size and frames on the default mesh (`--sharding auto`: the mode the compiler's numbers pick), every stage's
programs compiled, the VAE's included (on TPU its convolutions are our Pallas kernel: seconds, not XLA's minutes).

Columns (GiB per chip): the program's arguments (its weights and inputs), temporaries, generated code, the other
weights the process holds beside it (the other models', and a two-expert model's idle expert), and the peak
(their sum with the outputs). --out keeps each run's metrics.json, --from_dir renders the runs kept there without
compiling, --write puts the table into docs/MEMORY.md between its markers (memory_per_program for Wan 2.1's runs,
memory_per_program_wan22 for Wan 2.2's). --smoke: the tiny two-expert model on v5e-4 (seconds). The last line is
`runs N fits F programs P`. Compiler estimates, not measurements.
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

GiB = 1 << 30
WAN21, WAN22 = "Wan-AI/Wan2.1-T2V-", "Wan-AI/Wan2.2-"
# run -> (model id, height, width, frames, topology)
RUNS = {
    "14b-720p-v6e-8": (WAN21 + "14B-Diffusers", 720, 1280, 81, "v6e-8"),
    "1.3b-480p-v5e-1": (WAN21 + "1.3B-Diffusers", 480, 832, 81, "v5e-1"),
    "a14b-720p-v6e-8": (WAN22 + "T2V-A14B-Diffusers", 720, 1280, 81, "v6e-8"),
    "ti2v-5b-704p-v6e-1": (WAN22 + "TI2V-5B-Diffusers", 704, 1280, 121, "v6e-1"),
}
SMOKE = ("tiny-random-a14b", 32, 64, 9, "v5e-4")
PROGRAMS = {"encode": "UMT5 encode", "step": "denoising step", "decode": "VAE decode (scan over the latent frames)",
            "to_uint8": "frames to uint8"}


def block_of(run: str) -> str:
    return "memory_per_program_wan22" if RUNS[run][0].startswith(WAN22) else "memory_per_program"


def compile_run(run: str, model_id: str, height: int, width: int, frames: int, topology: str, folder: Path) -> dict:
    metrics = folder / f"{run}.json"
    cmd = [sys.executable, str(ROOT / "generate_flax.py"), "--model_id", model_id, "--height", str(height),
           "--width", str(width), "--frames", str(frames), "--topology", topology, "--compile_only",
           "--metrics", str(metrics)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode not in (0, 3):  # 3: does not fit, still a result
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    document = {**json.loads(metrics.read_text()), "run": run, "wall_s": time.perf_counter() - start,
                "measured_at": stamp()}
    metrics.write_text(json.dumps(document, indent=1))
    return document


def _gib(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def rows_of(run: str, document: dict) -> list[list[str]]:
    mesh, sharding = document["mesh"], document["config"].get("sharding")
    label = f"{run}, dp {mesh['dp']} x tp {mesh['tp']}" + (f", {sharding}" if sharding else "")
    rows = []
    for stage in document["stages"].values():
        for p in stage["compiled"]:
            name = PROGRAMS.get(p["name"].split()[0], p["name"])
            rows.append(["" if rows else label, name + (f" ({p['skipped']})" if p["skipped"] else ""),
                         _gib(p["argument_bytes"]), _gib(p["temp_bytes"]), _gib(p["generated_code_bytes"]),
                         _gib(p["held_bytes"]), _gib(p["peak_bytes"]), "yes" if p["fits"] else "no"])
    return rows


def table(rows: list[list[str]]) -> str:
    head = ["run", "program", "arguments", "temporaries", "code", "other weights held", "peak", "fits"]
    return markdown_table(head, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny two-expert model on v5e-4")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--write", action="store_true", help="write the tables into docs/MEMORY.md")
    parser.add_argument("--out", default=None, help="keep each run's metrics.json here (default: a temp folder)")
    parser.add_argument("--from_dir", default=None, help="no compiling: the table of the runs kept in this folder")
    args = parser.parse_args()
    rows, documents, fits, programs = {}, {}, 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        plan = [("smoke", *SMOKE)] if args.smoke else [(run, *RUNS[run]) for run in args.runs]
        for run, *spec in plan:
            kept = Path(args.from_dir or out) / f"{run}.json"
            if args.from_dir and not kept.is_file():
                continue
            document = json.loads(kept.read_text()) if args.from_dir else compile_run(run, *spec, out)
            block = "memory_per_program" if args.smoke else block_of(run)
            run_rows = rows_of(run, document)
            rows.setdefault(block, []).extend(run_rows)
            documents.setdefault(block, []).append(document)
            fits += document["fits"]
            programs += len(run_rows)
            print(*table(run_rows).splitlines()[2:], f"({document['wall_s']:.0f} s)", sep="\n", flush=True)
    for block, block_rows in rows.items():
        print(table(block_rows))
        if args.write and not args.smoke:
            write_block(block, table(block_rows), measured_line(documents[block]), ROOT / "docs" / "MEMORY.md")
    print(f"runs {sum(len(d) for d in documents.values())} fits {fits} programs {programs}")


if __name__ == "__main__":
    main()
