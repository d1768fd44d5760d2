"""python bench/real_size.py [--cache DIR] [--paths ours,naive] [--smoke] [--write]

Peak host memory and time of loading the real-size Wan 2.1 T2V 1.3B transformer (random bf16 weights), ours
(tpu_wan.models.transformer.Denoiser: meta-parameter model, every weight read from safetensors straight into its jax
array) against the naive path the project used before (diffusers from_pretrained(torch_dtype=bfloat16), then
torchax_env.functionalize and mesh.shard_weights: torch weights and their jax copies coexist).

The checkpoint (the real 1.3B transformer config, random weights from torch.manual_seed(0), saved in bf16 by
save_pretrained) is built once into --cache (default ~/.cache/tpu_wan/bench-wan1.3b-bf16/), in a subprocess
and atomically, and reused after. Each path then runs in its own subprocess (the same script with --child), so
peak RSS is per path: CPU backend, 1x1 mesh, bfloat16; import everything (baseline RSS taken right before
loading), load, then 2 UniPC steps with CFG (guidance 5.0) at latents [1, 16, 1, 4, 4] and 512 text tokens,
twice (the first call compiles). A sampler thread records RssAnon / RssFile (file pages mapped in, e.g. a
safetensors mmap) at the highest RSS it saw during the load; the high-water mark is then reset
(/proc/self/clear_refs), so the steps' own peak (compile + run) is reported apart from the load's. XLA_FLAGS
from the environment reach the children (e.g. --xla_cpu_enable_concurrency_optimized_scheduler=false).

On a CPU backend jax arrays ARE host memory: the loaded weights themselves live in RSS, so the floor here is
~1.0x the weight bytes plus the import baseline (on TPU the weights go to HBM and the host keeps only the
baseline and the transients). The last line is
`peak_rss_over_weights <ours peak RSS while loading / bf16 weight bytes>` (the goal is <= 1.3); the table
also gives the peak of the whole child, steps included. Takes ~5 minutes on a
2-core CPU (plus ~1 minute and 2.8 GB of disk to build the checkpoint once). --smoke: the same runs with a
2-layer transformer of the same kind (bf16, save_pretrained) built into a temporary folder and 16 text tokens
(seconds; its ratio is mostly the import baseline over tiny weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json, as the package ships it (tpu_wan.models.checkpoints)
REAL_CONFIG = {key: value for key, value in json.loads(
    (ROOT / "tpu_wan" / "models" / "model_configs" / "Wan2.1-T2V-1.3B-Diffusers" / "transformer" / "config.json")
    .read_text()).items() if not key.startswith("_")}
# --smoke: the same architecture at the tiny checkpoint's widths (tpu_wan.models.tiny); RoPE splits the head dim 8/4/4.
SMOKE_CONFIG = dict(REAL_CONFIG, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64,
                    num_layers=2)
SMOKE_TEXT_TOKENS = 16
WEIGHTS = "diffusion_pytorch_model.safetensors"
LATENTS = (1, 16, 1, 4, 4)  # 1 latent frame, 4x4 latents: 4 tokens after the (1, 2, 2) patching
TEXT_TOKENS = 512
STEPS = 2
GUIDANCE = 5.0
PATHS = ("ours", "naive")
GIB = 1024**3


def sizes(smoke: bool) -> tuple[dict, int]:
    """(transformer config, text tokens) of the run."""
    return (SMOKE_CONFIG, SMOKE_TEXT_TOKENS) if smoke else (REAL_CONFIG, TEXT_TOKENS)


# ----------------------------------------------------------------------------------------------- checkpoint

def checkpoint_ready(cache: Path, config: dict) -> bool:
    saved = cache / "transformer" / "config.json"
    if not (saved.is_file() and (cache / "transformer" / WEIGHTS).is_file()):
        return False
    saved = json.loads(saved.read_text())
    return all(saved.get(k) == v for k, v in config.items())


def build_checkpoint(cache: Path, config: dict) -> None:
    """Random transformer of `config`, constructed directly in bf16 (real config: 2.8 GB, not 5.7 GB of f32),
    saved atomically."""
    import torch
    from diffusers import WanTransformer3DModel

    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}-staging-"))
    try:
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # parameters are created (and initialised) in bf16
        try:
            model = WanTransformer3DModel(**config).eval()
        finally:
            torch.set_default_dtype(previous)
        dtypes = {p.dtype for p in model.parameters()}
        assert dtypes == {torch.bfloat16}, dtypes
        model.save_pretrained(staging / "transformer", safe_serialization=True)
        del model
        shutil.rmtree(cache, ignore_errors=True)  # a stale or mismatched build
        os.replace(staging, cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def tensor_bytes(files: list[Path]) -> tuple[int, int]:
    """(sum of the tensors' byte sizes from the safetensors headers, number of tensors)."""
    total = count = 0
    for file in files:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                total += end - start
                count += 1
    return total, count


# ------------------------------------------------------------------------------------------------ memory

def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Resets this process's peak RSS (VmHWM, and with it ru_maxrss) to its current RSS; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ru_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Sampler:
    """Polls /proc/self/status from a thread; keeps the sample with the highest VmRSS."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak = proc_status()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            s = proc_status()
            if s["VmRSS"] > self.peak["VmRSS"]:
                self.peak = s
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------------ children

def run_child(which: str, cache: Path, smoke: bool) -> dict:
    """One path in this process: imports, load, 2 steps twice; returns the measurements."""
    start = time.perf_counter()
    import jax
    import numpy as np
    from diffusers import WanTransformer3DModel  # noqa: F401  (both paths import it: same baseline)

    from tpu_wan.models import checkpoints
    from tpu_wan.models.kinds import ModelKind
    from tpu_wan.models.transformer import LAYERS, Denoiser
    from tpu_wan.runtime import attention, torchax_env
    from tpu_wan.runtime import mesh as mesh_lib
    from tpu_wan.sampling import schedulers

    mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
    torchax_env._env()  # torchax imported and its environment built before the baseline, in both paths
    import_s = time.perf_counter() - start
    baseline = proc_status()

    with Sampler() as sampler:
        start = time.perf_counter()
        if which == "ours":
            denoiser = Denoiser(cache, mesh, "bfloat16", kind=ModelKind())  # the folder holds transformer/ only
            placed = denoiser.weights
        else:
            # The naive path: a torch copy of every weight (from_pretrained), the module deep-copied by
            # functionalize (a second torch copy, which `forward` keeps alive through the steps, as a pipeline
            # built this way would), then jax copies on the mesh.
            model = checkpoints.load_transformer(cache, "bfloat16")
            weights, forward = torchax_env.functionalize(model, attention.make_attention("auto", mesh), scan=LAYERS)
            placed = mesh_lib.shard_weights(weights, mesh_lib.WAN_TRANSFORMER_RULES, mesh)
            del model, weights
        jax.block_until_ready(placed)
        load_s = time.perf_counter() - start
    after_load = proc_status()
    load_ru = ru_maxrss()
    load_sampled = sampler.peak
    if which == "naive":
        # The same jitted step as ours, over the naive weights: a Denoiser built by its own constructor with no
        # weights read (abstract: shapes only, a meta-device model), then given the placed ones.
        denoiser = Denoiser(cache, mesh, "bfloat16", abstract=True, kind=ModelKind())
        denoiser.experts["transformer"] = placed
    jax_bytes = sum(a.nbytes for a in denoiser.weights.values())
    # Reset the high-water mark (VmHWM and ru_maxrss both), so the steps' own peak can be read apart from the load's.
    steps_apart = reset_peak()

    rng = np.random.default_rng(0)
    latents = rng.standard_normal(LATENTS).astype(np.float32)
    config, text_tokens = sizes(smoke)
    embeds = (0.1 * rng.standard_normal((1, text_tokens, config["text_dim"]))).astype(np.float32)
    negative = (0.1 * rng.standard_normal((1, text_tokens, config["text_dim"]))).astype(np.float32)
    schedule = schedulers.make_schedule("unipc", 50, 3.0)
    steps_s = []
    for _ in range(2):  # the first call compiles
        start = time.perf_counter()
        out = denoiser.denoise(latents, embeds, negative, schedule, GUIDANCE, progress=False, num_steps=STEPS)
        steps_s.append(time.perf_counter() - start)
    end = proc_status()
    weight_bytes, _ = tensor_bytes([cache / "transformer" / WEIGHTS])
    return dict(
        path=which,
        import_s=import_s,
        load_s=load_s,
        steps_first_s=steps_s[0],
        steps_second_s=steps_s[1],
        baseline=baseline,
        after_load_rss=after_load["VmRSS"],
        load_peak=max(load_ru, after_load["VmHWM"]),
        load_sampled=load_sampled,
        steps_peak=max(ru_maxrss(), end["VmHWM"]) if steps_apart else None,
        peak_rss=max(load_ru, ru_maxrss(), after_load["VmHWM"], end["VmHWM"]),
        end_rss=end["VmRSS"],
        weight_bytes=weight_bytes,
        jax_weight_bytes=jax_bytes,
        output_finite=bool(np.isfinite(out).all()),
        output_shape=list(out.shape),
        backend=f"{jax.default_backend()} x{len(jax.devices())}",
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )


def spawn(args: list[str]) -> subprocess.CompletedProcess:
    from tpu_wan.cli import with_cpu_xla_flags  # the scripts' XLA settings, so the bench measures what users run

    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=with_cpu_xla_flags(os.environ.get("XLA_FLAGS", "")))
    # stderr goes straight through (warnings, progress); stdout carries the child's one JSON line.
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env, stdout=subprocess.PIPE,
                          text=True, cwd=ROOT)


# ------------------------------------------------------------------------------------------------ parent

def gb(n: int) -> str:
    return f"{n / GIB:6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Peak host RSS of loading the real-size Wan 2.1 1.3B transformer")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tpu_wan" / "bench-wan1.3b-bf16")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of ours,naive")
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer checkpoint of the same kind in a temporary folder, 16 text tokens")
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    parser.add_argument("--child", choices=PATHS + ("build",), help=argparse.SUPPRESS)
    args = parser.parse_args()
    config, _ = sizes(args.smoke)

    if args.child == "build":
        build_checkpoint(args.cache, config)
        return
    if args.child:
        print(json.dumps(run_child(args.child, args.cache, args.smoke)), flush=True)
        return
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="real-size-smoke-") as tmp:
            measure(Path(tmp) / "checkpoint", args.paths, smoke=True)
    else:
        measure(args.cache.expanduser().resolve(), args.paths, smoke=False, write=args.write)


def measure(cache: Path, paths: str, smoke: bool, write: bool = False) -> None:
    config, text_tokens = sizes(smoke)
    child_args = ["--cache", str(cache), *(["--smoke"] if smoke else [])]
    # The parent imports neither torch nor jax, so its RSS (which a child's ru_maxrss may inherit across exec)
    # stays negligible; the checkpoint is built in a child of its own for the same reason.
    if not checkpoint_ready(cache, config):
        print(f"building the random {'smoke' if smoke else '1.3B'} checkpoint into {cache} ...", flush=True)
        start = time.perf_counter()
        if spawn(["--child", "build", *child_args]).returncode or not checkpoint_ready(cache, config):
            sys.exit("building the checkpoint failed")
        print(f"built in {time.perf_counter() - start:.0f}s", flush=True)
    weight_bytes, count = tensor_bytes([cache / "transformer" / WEIGHTS])
    print(f"checkpoint {cache}: {count} tensors, {weight_bytes / 1e9:.3f} GB ({weight_bytes / GIB:.3f} GiB) of bf16 "
          f"weights", flush=True)

    results = {}
    for which in paths.split(","):
        if which not in PATHS:
            sys.exit(f"--paths: expected names from {PATHS}, found {which!r}")
        print(f"running {which} ...", flush=True)
        proc = spawn(["--child", which, *child_args])
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            sys.exit(f"child {which} failed (exit {proc.returncode}):\n{proc.stdout}")
        results[which] = json.loads(lines[-1])

    print()
    first = next(iter(results.values()))
    print(f"backend {first['backend']}, 1x1 mesh, bfloat16, XLA_FLAGS={first['xla_flags']!r}; latents {list(LATENTS)}, "
          f"{text_tokens} text tokens, {STEPS} UniPC steps with CFG; weights {weight_bytes / GIB:.2f} GiB on disk")
    print("GiB; baseline = RSS after the imports, right before loading; steps peak = the highest RSS while compiling "
          "and running the steps (high-water mark reset after the load); peak = the whole child")
    print(f"{'path':6s} {'load s':>6s} {'steps s':>7s} {'again s':>7s} {'baseline':>8s} {'after load':>10s} "
          f"{'load peak':>9s} {'steps peak':>10s} {'peak':>6s} {'load peak/w':>11s} {'peak/w':>6s}")
    for name, r in results.items():
        steps_peak = gb(r["steps_peak"]) if r["steps_peak"] is not None else "   n/a"
        print(f"{name:6s} {r['load_s']:6.1f} {r['steps_first_s']:7.1f} {r['steps_second_s']:7.1f} "
              f"{gb(r['baseline']['VmRSS']):>8s} {gb(r['after_load_rss']):>10s} {gb(r['load_peak']):>9s} "
              f"{steps_peak:>10s} {gb(r['peak_rss']):>6s} {r['load_peak'] / weight_bytes:11.2f} "
              f"{r['peak_rss'] / weight_bytes:6.2f}")
    for name, r in results.items():
        base, p = r["baseline"], r["load_sampled"]
        print(f"{name}: baseline {gb(base['VmRSS']).strip()} = anon {gb(base['RssAnon']).strip()} + file-mapped "
              f"{gb(base['RssFile']).strip()}; highest RSS sampled while loading {gb(p['VmRSS']).strip()} = anon "
              f"{gb(p['RssAnon']).strip()} + file-mapped {gb(p['RssFile']).strip()}; jax weights "
              f"{gb(r['jax_weight_bytes']).strip()} (f32 where diffusers keeps f32); output {r['output_shape']} "
              f"finite={r['output_finite']}")
    if "ours" in results and "naive" in results:
        o, n = results["ours"], results["naive"]
        above = (n["load_peak"] - n["baseline"]["VmRSS"]) / (o["load_peak"] - o["baseline"]["VmRSS"])
        print(f"naive / ours: peak {n['peak_rss'] / o['peak_rss']:.2f}x, load peak "
              f"{n['load_peak'] / o['load_peak']:.2f}x, load peak above baseline {above:.2f}x, "
              f"load time {n['load_s'] / o['load_s']:.2f}x")
    print("note: on the CPU backend the loaded jax weights are themselves host RSS, so the floor here is ~1.0x the "
          "weights + the baseline (on TPU they live in HBM)")
    if write and not smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from doc_tables import provenance, write_block

        write_block("real_size", markdown(results, weight_bytes), provenance())
    if "ours" in results:
        # The headline is the loading peak (what the loader controls); the steps' peak is in the table above.
        print(f"peak_rss_over_weights {results['ours']['load_peak'] / weight_bytes:.2f}")


def markdown(results: dict, weight_bytes: int) -> str:
    """bench/README.md's table of the run (GiB)."""
    lines = ["| path | load s | 2 steps s (compile) | again s | baseline | load peak | steps peak "
             "| load peak / weights "
             "| whole peak / weights |", "|" + "---|" * 9]
    for name, r in results.items():
        steps_peak = "n/a" if r["steps_peak"] is None else f"{r['steps_peak'] / GIB:.2f}"
        lines.append(f"| {name} | {r['load_s']:.1f} | {r['steps_first_s']:.1f} | {r['steps_second_s']:.1f} | "
                     f"{r['baseline']['VmRSS'] / GIB:.2f} | {r['load_peak'] / GIB:.2f} | {steps_peak} | "
                     f"{r['load_peak'] / weight_bytes:.2f} | {r['peak_rss'] / weight_bytes:.2f} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
