"""python bench/sharding_compile.py [--smoke] [--cases 1.3b-480p 14b-720p ...] [--topologies v6e-8 ...]
       [--modes megatron sequence] [--out DIR] [--from_dir DIR] [--write]

The denoising step in both sharding modes (tpu_wan.runtime.parallelism) as the TPU compiler sees it, compiled on this
CPU host (libtpu, deviceless: nothing runs, no weights are read). Each (case, slice, mode) runs
`stages/stage2_transformer.py --compile_only --topology T --sharding M` as its own process (81 frames, CFG, one
prompt, bfloat16, the slice's default mesh dp 2 x tp 4), so its compile seconds are its own.

Columns per step (both CFG rows), per chip: GB sent (traffic: ring algorithms' bytes, tpu_wan.tpu.hlo), GB counted
as the collectives' result sizes (the older count), the closed-form estimate `--sharding auto` decides by
(tpu_wan.tpu.arithmetic.dit_step_traffic_bytes) and its ratio to the compiler's count, peak GiB against the
compiler's HBM limit, compile seconds on this CPU. --out keeps each
metrics.json, --from_dir renders the table of those kept without compiling, --write puts it into bench/README.md
between its sharding_compile markers. --smoke: the tiny model on v5e-8 (seconds). The last line is
`cases N auto_agrees A worst_estimate_error E` (cases with both modes compiled, of which the estimate picks the
mode the compiler finds moves less; the largest |estimated / sent - 1| of any row). Compiler estimates, not measurements.
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
from doc_tables import current_commit, measured_line, stamp, write_block  # noqa: E402

GiB = 1 << 30
MODELS = {"1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers"}
SIZES = {"480p": (480, 832), "720p": (720, 1280)}
CASES = ("1.3b-480p", "14b-480p", "14b-720p")
TOPOLOGIES = ("v5e-8", "v6e-8", "v5p-8")
MODES = ("megatron", "sequence")


def compile_step(name: str, model_id: str, height: int, width: int, frames: int, topology: str, mode: str,
                 folder: Path) -> dict:
    out = folder / name
    cmd = [sys.executable, str(ROOT / "stages" / "stage2_transformer.py"), "--model_id", model_id, "--num_prompts",
           "1", "--height", str(height), "--width", str(width), "--frames", str(frames), "--topology", topology,
           "--compile_only", "--sharding", mode, "--output_dir", str(out), "--log_level", "WARNING"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode not in (0, 3):  # 3: does not fit, still a result
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    document = {**json.loads((out / "metrics.json").read_text()), "wall_s": time.perf_counter() - start,
                "measured_at": stamp()}
    (folder / f"{name}.json").write_text(json.dumps(document, indent=1))
    return document


def estimate(document: dict) -> float:
    """The closed form `--sharding auto` uses, at this document's model, size and mesh."""
    import jax.numpy as jnp

    from tpu_wan.core import config as config_lib
    from tpu_wan.models import checkpoints
    from tpu_wan.runtime import parallelism
    from tpu_wan.runtime.mesh import make_mesh
    from tpu_wan.tpu import arithmetic
    from tpu_wan.tpu.topology import parse_target

    c = document["config"]
    dit = checkpoints.read_config(checkpoints.resolve_configs(c["model_id"]), "transformer")
    shape = config_lib.latent_shape(c["batch_size"], c["height"], c["width"], c["frames"], dit["in_channels"])
    tokens = config_lib.video_tokens(shape, dit["patch_size"])
    mesh = make_mesh(document["mesh"]["dp"], document["mesh"]["tp"], parse_target(document["target"]["topology"]).devices())
    guided = c["guidance_scale"] > 1
    rows = c["batch_size"] * (2 if guided else 1)
    return arithmetic.dit_step_traffic_bytes(dit, parallelism.Layout(c["sharding"], mesh), rows, tokens,
                                             c["max_sequence_length"], jnp.dtype(c["dtype"]).itemsize, guided)


def row(case: str, document: dict) -> dict:
    step = document["stages"]["transformer"]["compiled"][0]
    t = document["target"]
    return {
        "case": case, "slice": t["topology"], "mode": document["config"]["sharding"],
        "mesh": f"dp {document['mesh']['dp']} x tp {document['mesh']['tp']}",
        "traffic": sum(c["traffic_bytes"] for c in step["collectives"].values()),
        "bytes": sum(c["bytes"] for c in step["collectives"].values()), "estimate": estimate(document),
        "peak": step["peak_bytes"], "usable": document["usable_bytes_per_device"], "compile_s": step["compile_s"],
    }


def table(rows: list[dict]) -> str:
    head = ["case (81 frames)", "slice", "mesh", "sharding", "GB sent per chip per step", "GB (result sizes)",
            "GB estimated", "estimated / sent", "peak / usable GiB per chip", "compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["case"], r["slice"], r["mesh"], r["mode"], f"{r['traffic'] / 1e9:.1f}", f"{r['bytes'] / 1e9:.1f}",
            f"{r['estimate'] / 1e9:.1f}", f"{r['estimate'] / r['traffic']:.3f}",
            f"{r['peak'] / GiB:.2f} / {r['usable'] / GiB:.2f}", f"{r['compile_s']:.0f}",
        ]) + " |")
    return "\n".join(lines)


def agreement(rows: list[dict]) -> tuple[int, int]:
    """(cases with both modes, cases where the estimate's cheaper mode is the compiler's)."""
    pairs: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        pairs.setdefault((r["case"], r["slice"]), {})[r["mode"]] = r
    both = [p for p in pairs.values() if len(p) == len(MODES)]
    agree = sum(min(p, key=lambda m: p[m]["traffic"]) == min(p, key=lambda m: p[m]["estimate"]) for p in both)
    return len(both), agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny model on v5e-8")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    parser.add_argument("--out", default=None, help="keep each metrics.json here (default: a temp folder)")
    parser.add_argument("--from_dir", default=None, help="no compiling: the table of the runs kept in this folder")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    plan = ([("tiny", "tiny-random", 16, 16, 5, "v5e-8", mode) for mode in args.modes] if args.smoke else
            [(case, MODELS[case.split("-")[0]], *SIZES[case.split("-")[1]], 81, topology, mode)
             for case in args.cases for topology in args.topologies for mode in args.modes])
    rows, documents = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        for case, model_id, height, width, frames, topology, mode in plan:
            name = f"{case}_{topology}_{mode}"
            kept = Path(args.from_dir or out) / f"{name}.json"
            if args.from_dir and not kept.is_file():
                continue
            document = (json.loads(kept.read_text()) if args.from_dir else
                        compile_step(name, model_id, height, width, frames, topology, mode, out))
            rows.append(row(case, document))
            documents.append(document)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    if args.write and not args.smoke:
        line = measured_line(documents)
        if args.from_dir:  # the closed-form column is computed now, by this checkout's formula
            line += f" Closed form of commit {current_commit()}."
        write_block("sharding_compile", text, line)
    both, agree = agreement(rows)
    worst = max(abs(r["estimate"] / r["traffic"] - 1) for r in rows)
    print(f"cases {both} auto_agrees {agree} worst_estimate_error {worst:.3f}")


if __name__ == "__main__":
    main()
