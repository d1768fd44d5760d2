"""python bench/tpu_compile.py [--smoke] [--cases 1.3b-480p 14b-720p ...] [--topologies v6e-8 ...] [--out DIR]
       [--from_dir DIR] [--write]

What the TPU compiler says of the real Wan runs on the slices users rent, compiled on this CPU host (libtpu,
deviceless: nothing runs, no weights are read). Each case runs
`generate_flax.py --compile_only --topology T --search_mesh --compile_stages text_encoder transformer` as its
own process (the model's frames, CFG, one prompt, bfloat16, default block sizes), so every mesh the slice and the
heads allow is compiled, in both DiT sharding modes: the default mesh's rows and the best one's come from the same
run. The VAE's weights count in each program's peak (one process holds all three models), and a two-expert
model's idle expert in its step's; the VAE's programs are not compiled here: at these sizes XLA:TPU takes many
minutes per 3D convolution program (see bench/README.md).

Columns: compile s on this CPU (text encoder + step, that mesh and mode), peak GiB per chip (the largest program,
the other models' weights included) against the compiler's HBM limit, fits, the step's FLOPs over the model's own
arithmetic, and the bytes each chip sends per denoising step (the collectives of the step's optimized HLO, as
ring algorithms move them: tpu_wan.tpu.hlo). --out keeps each case's metrics.json, and --from_dir renders the table of
the cases kept there without compiling. --write puts the table into bench/README.md between its markers
(tpu_compile for Wan 2.1's cases, tpu_compile_wan22 for Wan 2.2's).
--smoke: the tiny model on v5e-4, Megatron only (seconds). The last line is `cases N fits F` (cases compiled, of
which the default mesh fits). Compiler estimates, not measurements.
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
EIGHT_CHIPS = ("v5e-8", "v6e-8", "v5p-8")
# case -> (model id, height, width, frames, topologies): the sizes users ask about, on the slices they rent.
CASES = {
    "1.3b-480p": (WAN21 + "1.3B-Diffusers", 480, 832, 81, ("v5e-1", "v5e-4", "v6e-1", "v6e-4")),
    "14b-480p": (WAN21 + "14B-Diffusers", 480, 832, 81, EIGHT_CHIPS),
    "14b-720p": (WAN21 + "14B-Diffusers", 720, 1280, 81, EIGHT_CHIPS),
    "a14b-480p": (WAN22 + "T2V-A14B-Diffusers", 480, 832, 81, EIGHT_CHIPS),
    "a14b-720p": (WAN22 + "T2V-A14B-Diffusers", 720, 1280, 81, EIGHT_CHIPS),
    "ti2v-5b-704p": (WAN22 + "TI2V-5B-Diffusers", 704, 1280, 121, ("v5e-1", "v6e-1", "v5e-4", "v6e-4")),
}


def block_of(case: str) -> str:
    """The bench/README.md block a case's row goes to."""
    return "tpu_compile_wan22" if CASES[case][0].startswith(WAN22) else "tpu_compile"
# --smoke searches the meshes in one DiT mode: half the step programs (tests/test_compile_only.py covers both)
SMOKE_ARGS = ("--sharding", "megatron")


def compile_case(case: str, model_id: str, height: int, width: int, frames: int, topology: str,
                 folder: Path, *extra: str) -> dict:
    metrics = folder / f"{case}_{topology}.json"
    cmd = [sys.executable, str(ROOT / "generate_flax.py"), "--model_id", model_id, "--height", str(height),
           "--width", str(width), "--frames", str(frames), "--topology", topology, "--compile_only",
           "--search_mesh", "--compile_stages", "text_encoder", "transformer", "--metrics", str(metrics), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode not in (0, 3):  # 3: nothing fits, still a result
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    document = {**json.loads(metrics.read_text()), "case": case, "wall_s": time.perf_counter() - start,
                "measured_at": stamp()}
    metrics.write_text(json.dumps(document, indent=1))
    return document


def rows_of(case: str, document: dict) -> list[list[str]]:
    """The default mesh's row (in the mode --sharding auto keeps there: the compiler's choice) and, where another
    mesh or mode ranks first, the best one's."""
    from tpu_wan.run import aot
    from tpu_wan.runtime.mesh import default_mesh_shape

    t = document["target"]
    default = default_mesh_shape(t["devices"])
    # one chip: one mesh and one program for both modes, so no ranking; the run is its own only row
    ranked = document.get("mesh_search") or [{
        **document["mesh"], "sharding": document["config"].get("sharding"), "fits": document["fits"],
        "step_traffic_bytes": aot.step_collective_bytes(document, "traffic_bytes"),
        "peak_bytes": aot.peak_bytes(document), "compile_s": aot.compile_seconds(document)}]
    first_default = next(i for i, m in enumerate(ranked) if (m["dp"], m["tp"]) == default)
    step = document["stages"]["transformer"]["compiled"][0]
    ratio = "n/a" if step["flops"] is None else f"{step['flops'] / step['ideal_flops']:.2f}"
    rows = []
    for i, m in enumerate(ranked):
        if i not in (0, first_default):
            continue
        label = " / ".join(w for w, on in (("default", i == first_default), ("best", i == 0)) if on)
        mode = f", {m['sharding']}" if m.get("sharding") else ""
        sent = m["step_traffic_bytes"]
        rows.append([case, t["topology"], f"dp {m['dp']} x tp {m['tp']}{mode} ({label})", f"{m['compile_s']:.0f}",
                     f"{m['peak_bytes'] / GiB:.2f} / {document['usable_bytes_per_device'] / GiB:.2f}",
                     "yes" if m["fits"] else "no", ratio if i == 0 else "",
                     "not compiled" if sent is None else f"{sent / 1e9:.1f}"])
    return rows


def table(rows: list[list[str]]) -> str:
    head = ["case (81 frames; TI2V-5B 121)", "slice", "mesh", "compile s", "peak / usable GiB per chip", "fits",
            "step FLOPs / model's (best mesh)", "GB sent per chip per step"]
    return markdown_table(head, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny model on v5e-4")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--topologies", nargs="+", default=None, help="only these slices")
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    parser.add_argument("--out", default=None, help="keep each case's metrics.json here (default: a temp folder)")
    parser.add_argument("--from_dir", default=None, help="no compiling: the table of the cases kept in this folder")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    rows, fits, count, documents = {}, 0, 0, {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        plan = ([("tiny-random", "tiny-random", 16, 16, 5, "v5e-4")] if args.smoke else
                [(case, *CASES[case][:4], topology) for case in args.cases for topology in CASES[case][4]
                 if args.topologies is None or topology in args.topologies])
        for case, model_id, height, width, frames, topology in plan:
            kept = Path(args.from_dir or out) / f"{case}_{topology}.json"
            if args.from_dir and not kept.is_file():
                continue
            document = (json.loads(kept.read_text()) if args.from_dir else
                        compile_case(case, model_id, height, width, frames, topology, out, *SMOKE_ARGS * args.smoke))
            case_rows = rows_of(case, document)
            block = "tpu_compile" if args.smoke else block_of(case)
            documents.setdefault(block, []).append(document)
            rows.setdefault(block, []).extend(case_rows)
            count += 1
            fits += any("default" in r[2] and r[5] == "yes" for r in case_rows)
            print(*table(case_rows).splitlines()[2:], f"({document['wall_s']:.0f} s)", sep="\n", flush=True)
    for block, block_rows in rows.items():
        text = table(block_rows)
        print(text)
        if args.write and not args.smoke:
            write_block(block, text, measured_line(documents[block]))
    print(f"cases {count} fits {fits}")


if __name__ == "__main__":
    main()
