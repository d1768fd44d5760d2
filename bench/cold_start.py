"""Cold vs warm start of generate_flax.py with the persistent compilation cache.

    python bench/cold_start.py [--models tiny medium] [--cpu_devices 1] [--smoke] [--write]

For each model, three processes on one fresh cache folder: cold (empty cache), warm (same command again), and
warm with --no_compilation_cache (compiles everything again, as without the cache). Prints each process's wall
clock (imports included), the compile seconds and cache hits from its metrics.json, and as the last line
`tiny_cold_over_warm <x> tiny_uncached_over_warm <y> medium_cold_over_warm ... medium_uncached_over_warm ...`
(process wall clock). The uncached run is the fairer baseline: the cold one also pays for writing the cache
and for the first reads of the libraries from disk.

tiny: the tiny-random checkpoint. medium: random weights, a 4-layer DiT of 12 x 64 heads (dim 768), a 4-layer
UMT5 of d_model 512 and the real Wan 2.1 VAE config, built once into the cache folder. --smoke: tiny only, at
16x16x1 with 1 step and no warmup step, cold and warm only (seconds per process; last line `tiny_cold_over_warm`).
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
sys.path.insert(0, str(ROOT))

MEDIUM = dict(
    text_encoder_config=dict(d_model=512, d_kv=64, d_ff=1024, num_layers=4, num_heads=8),
    transformer_config=dict(num_attention_heads=12, attention_head_dim=64, ffn_dim=3072, num_layers=4,
                            text_dim=512, freq_dim=256),
    vae_config=dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
)
SIZES = {"tiny": ("--height", "32", "--width", "32", "--frames", "5"),
         "medium": ("--height", "64", "--width", "64", "--frames", "9")}
STEPS = ("--num_inference_steps", "4", "--warmup_steps", "1")
SMOKE = ("--height", "16", "--width", "16", "--frames", "1", "--num_inference_steps", "1", "--warmup_steps", "0")
SUMMARY_NAMES = {"tiny": "tiny-random, 32x32x5", "medium": "medium (4-layer 768-dim DiT, real VAE config), 64x64x9"}


def model_path(name: str) -> str:
    if name == "tiny":
        return "tiny-random"
    from filelock import FileLock

    from tpu_wan.core.config import cache_root
    from tpu_wan.models.tiny import build_tiny_checkpoint

    path = cache_root() / "bench-medium-v1"
    with FileLock(str(path) + ".lock"):
        if not (path / "model_index.json").is_file():
            build_tiny_checkpoint(path, **MEDIUM)
    return str(path)


def generate(model: str, run: tuple[str, ...], cache: Path, out: Path, cpu_devices: int, *extra: str) -> dict:
    """`run`: the size and step arguments."""
    cmd = [sys.executable, str(ROOT / "generate_flax.py"), "--model_id", model, *run, "--cpu_devices",
           str(cpu_devices), "--compilation_cache_dir", str(cache), "--output_video", str(out / "video.mp4"), *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    wall = time.perf_counter() - start
    m = json.loads((out / "metrics.json").read_text())
    stages = m["stages"].values()
    return {"process_s": wall, "total_s": m["total_s"], "compile_s": sum(s["compile_s"] for s in stages),
            "cache_hits": sum(s["cache_hits"] for s in stages), "compilations": sum(s["compilations"] for s in stages)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "medium"], choices=sorted(SIZES))
    parser.add_argument("--cpu_devices", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny only, smallest size, 1 step")
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    args = parser.parse_args()
    runs_of = {"tiny": SMOKE} if args.smoke else {name: (*SIZES[name], *STEPS) for name in args.models}
    ratios, table = {}, ["| model | run | process s | total s | compile s | programs | cache hits |", "|" + "---|" * 7]
    summary = ["| model | cold: process s / compile s | warm: process s / compile s | cold / warm |", "|" + "---|" * 4]
    print(f"{'model':<8} {'run':<10} {'process s':>9} {'total s':>8} {'compile s':>9} {'programs':>8} {'hits':>5}")
    for name, run_args in runs_of.items():
        model = model_path(name)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            runs = {
                "cold": generate(model, run_args, tmp / "cache", tmp / "cold", args.cpu_devices),
                "warm": generate(model, run_args, tmp / "cache", tmp / "warm", args.cpu_devices),
            }
            if not args.smoke:  # the same call with one more flag: the smoke leaves it out
                runs["no cache"] = generate(model, run_args, tmp / "cache", tmp / "off", args.cpu_devices,
                                            "--no_compilation_cache")
        labels = {"cold": "cold (empty cache)", "warm": "warm", "no cache": "`--no_compilation_cache`"}
        for run, r in runs.items():
            print(f"{name:<8} {run:<10} {r['process_s']:9.2f} {r['total_s']:8.2f} {r['compile_s']:9.2f} "
                  f"{r['compilations']:8d} {r['cache_hits']:5d}")
            table.append(f"| {name} | {labels[run]} | {r['process_s']:.2f} | {r['total_s']:.2f} | {r['compile_s']:.2f} "
                         f"| {r['compilations']} | {r['cache_hits']} |")
        ratios[f"{name}_cold_over_warm"] = runs["cold"]["process_s"] / runs["warm"]["process_s"]
        cold, warm = runs["cold"], runs["warm"]
        summary.append(f"| {SUMMARY_NAMES.get(name, name)} | {cold['process_s']:.2f} / {cold['compile_s']:.2f} | "
                       f"{warm['process_s']:.2f} / {warm['compile_s']:.2f} | {ratios[f'{name}_cold_over_warm']:.2f} |")
        if "no cache" in runs:
            ratios[f"{name}_uncached_over_warm"] = runs["no cache"]["process_s"] / runs["warm"]["process_s"]
    if args.write and not args.smoke:
        sys.path.insert(0, str(ROOT / "bench"))
        from doc_tables import provenance, write_block

        line = provenance()  # once: the first write changes the tree
        write_block("cold_start", "\n".join(table), line)
        write_block("cold_start_summary", "\n".join(summary), line, ROOT / "README.md")
    print(" ".join(f"{key} {ratio:.3f}" for key, ratio in ratios.items()))


if __name__ == "__main__":
    main()
