"""python bench/gpu_real.py [--steps 3] [--budget_s 420] [--cache DIR] [--no_torch_compile] [--smoke] [--write]

On a GPU machine run it through `bash bench/gpu_setup.sh run` (bench/README.md says how).

Wan 2.1 T2V 1.3B at its trained size (832x480, 81 frames), bfloat16, CFG (guidance 5.0), random weights built
on the spot (no download): our stage-2 step (tpu_wan.models.transformer.Denoiser's step program: the CFG pair as one
batch of 2, the guidance combine and the UniPC update, 1x1 mesh, --attention auto: cuDNN flash attention on a
GPU) against diffusers' WanPipeline step as its loop runs it (WanTransformer3DModel in torch, SDPA, bfloat16: a
cond and an uncond forward, the combine, UniPCMultistepScheduler.step), eager and under torch.compile. Each side
runs in its own process (JAX and torch each keep their own GPU memory); after a warmup step each, the timed
steps are interleaved across the processes, one process at a time, alternating who goes first. Agreement: each
side's guided velocity for the same first-step inputs (ours: the step program with a schedule row whose update
is `next = v`), each side's bf16 error ||v - v_f32|| / ||v_f32|| against diffusers' float32 forward on the same
weights, and ours over diffusers' (as tests/test_bf16_parity.py measures the pipeline). Every wait on a process
ends by --budget_s; the GPU run checks that JAX really runs on the GPU. Then the VAE decode of one video (float32, as WanPipeline runs
it; latents in, frames on the host), ours and diffusers', timed after a warmup decode each.

Prints s/step (median) per side, ours/diffusers, our lower+compile time, whether cuDNN attention is in our
compiled step, peak GPU memory per side (JAX: peak_bytes_in_use; torch: max_memory_allocated; both include the
weights) and the VAE decode times. torch.compile gets what --budget_s leaves: its process compiles while the
others load and warm up, and is dropped (said so) if its warmup step has not finished RESERVE_S seconds before
the budget ends (what the timed steps and the decodes take after it). Last line: `ratio_eager <ours / diffusers eager s/step> ratio_compiled <ours /
diffusers compiled s/step, or nan>`.

--smoke: the tiny-random checkpoint (tpu_wan.models.tiny) at latents [1, 16, 2, 8, 8] and 16 text tokens on whatever
device there is (the CPU in the test suite), one timed step, torch.compile with its "eager" backend (seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

GUIDANCE = 5.0
FLOW_SHIFT = 3.0  # Wan 2.1 at 480p
SCHEDULE_STEPS = 50  # the schedule the timed steps are taken from (its first rows)
LATENTS = (1, 16, 21, 60, 104)  # 81 frames at 832x480: (81 - 1) / 4 + 1 latent frames, H / 8, W / 8
TEXT_TOKENS, TEXT_DIM = 512, 4096
SMOKE_LATENTS, SMOKE_TEXT_TOKENS = (1, 16, 2, 8, 8), 16
SIDES = ("ours", "eager", "compiled")
REPLY = "@@ "  # a child's replies on stdout start with this; anything else it prints goes to stderr
GIB = 1024**3
RESERVE_S = 120.0


# ------------------------------------------------------------------------------------------------ inputs

def inputs(latents_shape: tuple[int, ...], text_tokens: int, text_dim: int):
    """The same starting latents [1, C, F, H, W] and cond / uncond text embeddings [2, S, Dt] in every process."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal(latents_shape).astype(np.float32)
    embeds = rng.standard_normal((2, text_tokens, text_dim)).astype(np.float32)
    return latents, embeds


def vae_latents(latents_shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(1).standard_normal(latents_shape).astype(np.float32)


def ensure_checkpoints(cache: Path) -> tuple[Path, Path]:
    """(folder with transformer/, folder with vae/): the real Wan 2.1 1.3B transformer (bf16) and VAE configs with
    random weights (seed 0), built once into `cache` (bench/real_size.py, bench/vae_decode.py build them)."""
    from real_size import REAL_CONFIG, build_checkpoint, checkpoint_ready
    from vae_decode import ensure_real_vae

    dit, vae = cache / "dit", cache / "vae"
    cache.mkdir(parents=True, exist_ok=True)
    if not checkpoint_ready(dit, REAL_CONFIG):
        build_checkpoint(dit, REAL_CONFIG)
    ensure_real_vae(vae)
    return dit, vae


# ------------------------------------------------------------------------------------------------ children

def reply(**fields) -> None:
    print(REPLY + json.dumps(fields), flush=True)


def commands():
    for line in sys.stdin:
        yield json.loads(line)


class OursSide:
    """Our stage-2 step program and VAE decoder, in JAX, on the first device."""

    def __init__(self, dit: Path, vae: Path, latents: np.ndarray, embeds: np.ndarray):
        import jax
        import jax.numpy as jnp

        from tpu_wan.models.transformer import Denoiser
        from tpu_wan.runtime import mesh as mesh_lib
        from tpu_wan.sampling import schedulers

        self.jax, self.vae_path = jax, vae
        self.device = jax.devices()[0]
        self.mesh = mesh_lib.make_mesh(1, 1, devices=[self.device])
        start = time.perf_counter()
        self.denoiser = Denoiser(dit, self.mesh, "bfloat16", "auto")
        self.load_s = time.perf_counter() - start
        self.schedule = schedulers.make_schedule("unipc", SCHEDULE_STEPS, FLOW_SHIFT)
        sharding = mesh_lib.batch_sharding(self.mesh, latents.shape[0], 5)
        self.x = self.x0 = jax.device_put(latents, sharding)
        self.state = self.state0 = jax.device_put(schedulers.init_state(self.x), sharding)
        self.emb = jax.device_put(jnp.asarray(embeds).astype(self.denoiser.dtype), mesh_lib.batch_sharding(self.mesh, 2, 3))
        step, _ = self.denoiser.step_program(latents.shape, embeds.shape, cfg=True)
        start = time.perf_counter()
        self.step_fn = step.lower(*self._args(0)).compile()
        self.compile_s = time.perf_counter() - start
        hlo = self.step_fn.as_text()
        self.cudnn_calls = hlo.count('custom_call_target="__cudnn$fmha')
        self.i = 0
        identity = np.zeros(schedulers.NUM_COEFFS, np.float32)
        identity[schedulers.P_V] = 1.0  # the update returns the guided velocity itself
        self.identity = jnp.asarray(identity)

    def _args(self, i, coeffs=None, x=None, state=None):
        jnp = self.jax.numpy
        row = self.schedule.coeffs[i] if coeffs is None else coeffs
        return (self.denoiser.weights, self.x if x is None else x, self.state if state is None else state, self.emb,
                jnp.float32(self.schedule.timesteps[i]), jnp.asarray(row), jnp.float32(GUIDANCE), {})  # {}: no image

    def velocity(self) -> np.ndarray:
        """The guided velocity at the first step's inputs."""
        v, _ = self.step_fn(*self._args(0, self.identity, self.x0, self.state0))
        return np.asarray(v, np.float32)

    def step(self) -> None:
        self.x, self.state = self.step_fn(*self._args(self.i))
        self.x.block_until_ready()
        self.i += 1

    def peak_bytes(self) -> int | None:
        stats = self.device.memory_stats() or {}
        return stats.get("peak_bytes_in_use")

    def decode(self, latents: np.ndarray) -> None:
        from tpu_wan.models.vae import VaeDecoder

        if not hasattr(self, "decoder"):
            self.decoder = VaeDecoder(self.vae_path, self.mesh, "float32")
        self.decoder.decode(latents)


class TorchSide:
    """diffusers' WanTransformer3DModel as WanPipeline's loop calls it, and AutoencoderKLWan.decode, in torch."""

    def __init__(self, dit: Path, vae: Path, latents: np.ndarray, embeds: np.ndarray, compile_backend: str | None):
        import torch
        from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
        from diffusers.utils import logging as df_logging

        from tpu_wan.models.tiny import SCHEDULER_CONFIG

        df_logging.set_verbosity_error()
        torch.set_grad_enabled(False)
        self.torch, self.vae_path, self.dit_path = torch, vae, dit
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        start = time.perf_counter()
        model = WanTransformer3DModel.from_pretrained(dit / "transformer", torch_dtype=torch.bfloat16)
        self.model = model.to(self.device).eval()
        self.sync()
        self.load_s = time.perf_counter() - start
        if compile_backend:
            self.model = torch.compile(self.model, backend=compile_backend)
        self.scheduler = UniPCMultistepScheduler(**dict(SCHEDULER_CONFIG, flow_shift=FLOW_SHIFT))
        self.scheduler.set_timesteps(SCHEDULE_STEPS, device=self.device)
        self.latents = self.latents0 = torch.from_numpy(latents).to(self.device)
        self.cond, self.uncond = (torch.from_numpy(e[None]).to(self.device, torch.bfloat16) for e in embeds)
        self.i = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _guided(self, latents, t):
        x = latents.to(self.torch.bfloat16)
        timestep = t.expand(x.shape[0])
        cond = self.model(hidden_states=x, timestep=timestep, encoder_hidden_states=self.cond, return_dict=False)[0]
        uncond = self.model(hidden_states=x, timestep=timestep, encoder_hidden_states=self.uncond, return_dict=False)[0]
        return uncond + GUIDANCE * (cond - uncond)

    def velocity(self) -> np.ndarray:
        """The guided velocity at the first step's inputs."""
        v = self._guided(self.latents0, self.scheduler.timesteps[0])
        return v.float().cpu().numpy()

    def reference_velocity(self) -> np.ndarray:
        """The same guided velocity in float32 (the transformer loaded again in float32, then freed): what both
        sides' bf16 is measured against."""
        from diffusers import WanTransformer3DModel

        torch = self.torch
        model = WanTransformer3DModel.from_pretrained(self.dit_path / "transformer", torch_dtype=torch.float32)
        model = model.to(self.device).eval()
        t = self.scheduler.timesteps[0].expand(1)
        x = self.latents0.float()
        cond, uncond = (model(hidden_states=x, timestep=t, encoder_hidden_states=e.float(), return_dict=False)[0]
                        for e in (self.cond, self.uncond))
        v = uncond + GUIDANCE * (cond - uncond)
        del model, cond, uncond
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return v.cpu().numpy()

    def step(self) -> None:
        t = self.scheduler.timesteps[self.i]
        self.latents = self.scheduler.step(self._guided(self.latents, t), t, self.latents, return_dict=False)[0]
        self.sync()
        self.i += 1

    def peak_bytes(self) -> int | None:
        return self.torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None

    def decode(self, latents: np.ndarray) -> None:
        """WanPipeline's decode (bench/vae_decode.py's torch_decode), frames back on the host."""
        from vae_decode import torch_decode

        if not hasattr(self, "vae"):
            from diffusers import AutoencoderKLWan

            self.vae = AutoencoderKLWan.from_pretrained(self.vae_path / "vae", torch_dtype=self.torch.float32)
            self.vae = self.vae.to(self.device)
        torch_decode(self.vae, latents)


def run_child(args) -> None:
    """One side in this process: load, compile, warm up, then answer the parent's commands one per line."""
    shapes = (SMOKE_LATENTS, SMOKE_TEXT_TOKENS) if args.smoke else (LATENTS, TEXT_TOKENS)
    text_dim = json.loads((args.dit / "transformer" / "config.json").read_text())["text_dim"]
    latents, embeds = inputs(shapes[0], shapes[1], text_dim)
    if args.child == "ours":
        side = OursSide(args.dit, args.vae, latents, embeds)
        extra = dict(compile_s=side.compile_s, cudnn_calls=side.cudnn_calls,
                     platform=side.device.platform, version=f"jax {side.jax.__version__}")
    else:
        import torch

        side = TorchSide(args.dit, args.vae, latents, embeds, args.compile_backend if args.child == "compiled" else None)
        extra = dict(platform=side.device.type, version=f"torch {torch.__version__}")
    start = time.perf_counter()
    side.step()  # the warmup step (torch.compile compiles here)
    reply(ready=True, load_s=side.load_s, warmup_s=time.perf_counter() - start, **extra)
    for command in commands():
        what = command["do"]
        if what == "step":
            start = time.perf_counter()
            side.step()
            reply(seconds=time.perf_counter() - start)
        elif what == "velocity":
            np.save(command["path"], side.reference_velocity() if command.get("float32") else side.velocity())
            reply(saved=command["path"])
        elif what == "peak":
            reply(peak_bytes=side.peak_bytes())
        elif what == "decode":
            z = vae_latents(tuple(command["shape"]))
            times = []
            for _ in range(2):  # warmup (compiles, loads cuDNN's kernels), then the timed one
                start = time.perf_counter()
                side.decode(z)
                times.append(time.perf_counter() - start)
            reply(first_s=times[0], seconds=times[1], peak_bytes=side.peak_bytes())
        elif what == "quit":
            return


# ------------------------------------------------------------------------------------------------ parent

class Child:
    """One side's process; a thread reads its replies so a wait can time out."""

    def __init__(self, side: str, dit: Path, vae: Path, smoke: bool, compile_backend: str):
        cmd = [sys.executable, __file__, "--child", side, "--dit", str(dit), "--vae", str(vae),
               "--compile_backend", compile_backend] + (["--smoke"] if smoke else [])
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", TF_CPP_MIN_LOG_LEVEL="2")
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info: dict | None = None
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                self.replies.put(json.loads(line[len(REPLY):]))
            else:  # what a library printed
                sys.stderr.write(f"[{self.side}] {line}")
        self.replies.put(None)  # the process ended

    def read(self, deadline: float, *, required: bool = True) -> dict | None:
        """The child's next reply; past the deadline: a RuntimeError, or None where not `required`."""
        try:
            reply = self.replies.get(timeout=max(0.0, deadline - time.time()))
        except queue.Empty:
            if not required:
                return None
            raise RuntimeError(f"{self.side}: no answer within the --budget_s deadline") from None
        if reply is None:
            raise RuntimeError(f"{self.side}: the process ended (exit {self.proc.wait()}); its error is above")
        return reply

    def ask(self, deadline: float, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.read(deadline)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"do": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def bf16_errors(children: dict[str, Child], folder: Path, deadline: float) -> dict[str, float]:
    """||v_side - v_f32|| / ||v_f32|| for every side: its bf16 guided velocity at the same first-step inputs
    against diffusers' in float32 (the eager process computes it)."""
    v = {}
    for side, child in children.items():
        path = folder / f"v_{side}.npy"
        child.ask(deadline, do="velocity", path=str(path))
        v[side] = np.load(path).astype(np.float64)
    path = folder / "v_float32.npy"
    children["eager"].ask(deadline, do="velocity", path=str(path), float32=True)
    ref = np.load(path).astype(np.float64)
    return {side: float(np.linalg.norm(v[side] - ref) / np.linalg.norm(ref)) for side in v}


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Wan 2.1 1.3B at 480p x 81 frames: ours (JAX) vs diffusers (torch)")
    parser.add_argument("--steps", type=int, default=3, help="timed denoising steps per side")
    parser.add_argument("--budget_s", type=float, default=420.0,
                        help="wall-clock budget of this script (gpu_setup.sh's install comes before it); "
                             "torch.compile is dropped if it would overrun it")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the random checkpoints are built (default: bench-gpu-wan1.3b beside the "
                             "tiny-random cache)")
    parser.add_argument("--no_torch_compile", action="store_true", help="skip diffusers under torch.compile")
    parser.add_argument("--compile_backend", default=None, help="torch.compile backend (default inductor; smoke eager)")
    parser.add_argument("--smoke", action="store_true", help="tiny-random checkpoint, tiny latents, one step")
    parser.add_argument("--write", action="store_true",
                        help="write the results table into bench/README.md (with $OUT set, a copy goes there too)")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--dit", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--vae", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    if args.child:
        return run_child(args)
    start = time.time()
    deadline = start + args.budget_s - RESERVE_S
    if args.smoke:
        from tpu_wan.models.tiny import ensure_tiny_checkpoint

        args.steps = 1
        dit = vae = ensure_tiny_checkpoint()
        latents_shape = SMOKE_LATENTS
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_real.py: expected an NVIDIA GPU (torch.cuda.is_available()), found none; --smoke runs "
                  "anywhere", file=sys.stderr)
            sys.exit(2)
        from tpu_wan.models.tiny import default_cache_dir

        cache = (args.cache or default_cache_dir().parent / "bench-gpu-wan1.3b").expanduser()
        dit, vae = ensure_checkpoints(cache)
        latents_shape = LATENTS
    build_s = time.time() - start
    print(f"checkpoints ready in {build_s:.0f} s: {dit} {vae}", flush=True)

    sides = SIDES if not args.no_torch_compile else SIDES[:2]
    children = {side: Child(side, dit, vae, args.smoke, args.compile_backend) for side in sides}
    end = start + args.budget_s  # no wait outlasts the budget
    try:
        for side in ("ours", "eager"):  # every side loads and warms up at once; the eager ones are waited for
            children[side].info = children[side].read(end)
        device = (children["ours"].info["platform"], children["eager"].info["platform"])
        if not args.smoke and device != ("gpu", "cuda"):
            raise RuntimeError(f"expected ours on jax's GPU backend and diffusers on CUDA, found {device[0]} and "
                               f"{device[1]} (is jax's CUDA plugin installed? bench/gpu_setup.sh)")
        results = {side: [] for side in children}
        if "compiled" in children:
            info = children["compiled"].read(deadline, required=False)
            if info is None:
                print(f"torch.compile: warmup not done {time.time() - start:.0f} s in ({args.budget_s:.0f} s budget, "
                      f"{RESERVE_S:.0f} s kept for the rest); dropped", flush=True)
                children.pop("compiled").proc.kill()
                results.pop("compiled")
            else:
                children["compiled"].info = info
        for i in range(args.steps):  # interleaved: one process at a time, the order rotating each round
            order = list(children)[i % len(children):] + list(children)[:i % len(children)]
            for side in order:
                results[side].append(children[side].ask(end, do="step")["seconds"])
        peaks = {side: child.ask(end, do="peak")["peak_bytes"] for side, child in children.items()}
        with tempfile.TemporaryDirectory() as tmp:
            errors = bf16_errors(children, Path(tmp), end)
        vae_shape = (1, 16) + tuple(latents_shape[2:])
        decodes = {side: children[side].ask(end, do="decode", shape=vae_shape) for side in ("ours", "eager")}
    except RuntimeError as err:
        print(f"gpu_real.py: error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        for child in children.values():
            child.close()

    ours, eager = children["ours"].info, children["eager"].info
    print(f"\n{ours['version']} ({ours['platform']}), {eager['version']} ({eager['platform']}); latents "
          f"{list(latents_shape)}, CFG {GUIDANCE}, bf16, {args.steps} timed step(s) per side after a warmup")
    print(f"ours: load {ours['load_s']:.1f} s, lower+compile {ours['compile_s']:.1f} s, cuDNN attention calls in the "
          f"step {ours['cudnn_calls']}")
    print(f"\n{'side':10s} {'s/step':>8s} {'ours/it':>8s} {'warmup s':>9s} {'peak GiB':>9s} {'bf16 err':>9s}")
    median = {side: statistics.median(times) for side, times in results.items()}
    for side in results:
        ratio = "" if side == "ours" else f"{median['ours'] / median[side]:8.3f}"
        print(f"{side:10s} {median[side]:8.3f} {ratio:>8s} {children[side].info['warmup_s']:9.1f} "
              f"{gib(peaks[side]):>9s} {errors[side]:9.2e}")
    print(f"bf16 err: ||v - v_f32|| / ||v_f32|| of the first step's guided velocity against diffusers in float32; "
          f"ours / diffusers eager {errors['ours'] / errors['eager']:.3f}")
    print(f"\nVAE decode of {vae_shape} (float32): ours {decodes['ours']['seconds']:.2f} s (first call "
          f"{decodes['ours']['first_s']:.1f} s, peak {gib(decodes['ours']['peak_bytes'])} GiB), diffusers "
          f"{decodes['eager']['seconds']:.2f} s (first {decodes['eager']['first_s']:.1f} s, peak "
          f"{gib(decodes['eager']['peak_bytes'])} GiB), ours/diffusers "
          f"{decodes['ours']['seconds'] / decodes['eager']['seconds']:.3f}")
    print(f"total {time.time() - start:.0f} s (checkpoints {build_s:.0f} s)")
    compiled = median["ours"] / median["compiled"] if "compiled" in median else math.nan
    if args.write and not args.smoke:
        write_results(children, median, peaks, errors, decodes)
    print(f"ratio_eager {median['ours'] / median['eager']:.3f} ratio_compiled {compiled:.3f}")


def write_results(children: dict, median: dict, peaks: dict, errors: dict, decodes: dict) -> None:
    """bench/README.md's GPU table: this run's row (and, where $OUT names a folder, a copy of the file there, for a
    machine whose files do not come back otherwise)."""
    import shutil

    import torch
    from doc_tables import provenance, write_block

    compiled = f"{median['compiled']:.3f} | {median['ours'] / median['compiled']:.3f}" if "compiled" in median else \
        "dropped | -"
    row = (f"| {torch.cuda.get_device_name()} | {median['ours']:.3f} | {median['eager']:.3f} | "
           f"{median['ours'] / median['eager']:.3f} | {compiled} | {children['ours'].info['compile_s']:.1f} | "
           f"{gib(peaks['ours'])} / {gib(peaks['eager'])} | {errors['ours']:.2e} / {errors['eager']:.2e} | "
           f"{decodes['ours']['seconds']:.2f} / {decodes['eager']['seconds']:.2f} |")
    head = ("| GPU | ours s/step | diffusers eager s/step | ours / eager | diffusers compiled s/step | ours / compiled "
            "| our compile s | peak GiB ours / eager | bf16 err ours / eager | VAE decode s ours / diffusers |")
    write_block("gpu_real", "\n".join([head, "|" + "---|" * 10, row]), provenance())
    if os.environ.get("OUT"):
        shutil.copy(ROOT / "bench" / "README.md", Path(os.environ["OUT"]) / "README.md")


if __name__ == "__main__":
    main()
