"""Command-line plumbing shared by the scripts: flag groups, cheap flag checks and process setup (the error
contract itself is tpu_wan.core.entry).

Importing this module does not import jax: `setup_process` may still set XLA flags (e.g. virtual CPU
devices) before the first jax import.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from pathlib import Path

from tpu_wan.core.config import (
    ATTENTION_CHOICES,
    DEFAULT_MODEL_ID,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_PROMPT,
    DEFAULT_SEED,
    DEFAULT_SOLVER,
    DTYPES,
    SHARDING_CHOICES,
    SOLVERS,
    AttentionOptions,
    LoraFile,
    Stage2Settings,
)
from tpu_wan.core.entry import Parser, Terminated, make_parser, run_main  # noqa: F401  (the scripts' entry points)
from tpu_wan.core.errors import DoesNotFit, UsageError, UserError  # noqa: F401

log = logging.getLogger("tpu_wan")

DEFAULT_OUTPUT_DIR = "stage_outputs"
STAGES = ("text_encoder", "transformer", "vae")  # tpu_wan.runtime.profiling.STAGES, without importing it
# XLA's CPU backend has no bf16 matmul: it converts each bf16 weight to f32, and its default scheduler hoists
# all those conversions to the start of the step, keeping an f32 copy of every weight alive at once (5.7 GB of
# temporaries for the 1.3B model; 62 MB with this off). Only the CPU backend reads it.
CPU_XLA_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def with_cpu_xla_flags(flags: str) -> str:
    """XLA_FLAGS with CPU_XLA_FLAGS added (unless the user set that flag already)."""
    name = CPU_XLA_FLAGS.split("=")[0]
    return flags if name in flags else f"{flags} {CPU_XLA_FLAGS}".strip()

def add_mesh_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mesh")
    g.add_argument("--dp", type=int, default=None, help="data-parallel size (default: 2 if the device count is even)")
    g.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: devices / dp)")
    g.add_argument("--cpu_devices", type=int, default=None,
                   help="run on N virtual CPU devices (testing sharding without accelerators)")
    g.add_argument("--log_level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="INFO: what each stage decides (resume, batches, compiles); WARNING or ERROR quiets it; "
                        "DEBUG adds the libraries' own logs (default: INFO)")
    g.add_argument("--compilation_cache_dir", default=None,
                   help="persistent XLA compilation cache: a rerun with the same shapes skips compiling "
                        "(default: $JAX_COMPILATION_CACHE_DIR, else <cache>/jax_compilation_cache)")
    g.add_argument("--no_compilation_cache", action="store_true", help="compile everything afresh")
    g.add_argument("--programs", default=None, metavar="DIR",
                   help="programs compiled ahead (--compile_only --export DIR): each one whose key matches this run "
                        "(versions, code, devices, mesh, shapes, settings) is loaded instead of compiled; the others "
                        "compile as usual, each with one warning line saying what differs")
    g.add_argument("--distributed", action="store_true",
                   help="several processes, one mesh (jax.distributed; on a multi-host TPU slice this is "
                        "detected and the peers found by themselves)")
    g.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                   help="process 0's address, where JAX cannot detect it (e.g. several processes on one machine)")
    g.add_argument("--num_processes", type=int, default=None)
    g.add_argument("--process_id", type=int, default=None)


def add_compile_args(p: argparse.ArgumentParser, *, stage2: bool = False) -> None:
    g = p.add_argument_group("compile only (no TPU needed: the TPU compiler runs on this host, nothing runs)")
    g.add_argument("--topology", default=None, metavar="NAME",
                   help="the TPU slice to compile for: v4-8, v5e-1, v5e-4, v5e-8, v5p-8, v6e-1, v6e-4, v6e-8, "
                        "v6e-16, v5p-16, ... (default with --compile_only: this host's own devices, e.g. the CPU "
                        "with --cpu_devices N)")
    g.add_argument("--compile_only", action="store_true",
                   help="compile every program of this run for --topology and report memory per chip, FLOPs and "
                        "collectives (exit 3 if something does not fit); loads no weights, writes no video")
    g.add_argument("--export", default=None, metavar="DIR",
                   help="with --compile_only: also write every compiled program into DIR (serialized, with its key), "
                        "for runs to load with --programs DIR instead of compiling")
    g.add_argument("--search_mesh", action="store_true",
                   help="with --compile_only: compile every (dp, tp) the slice and the models allow, in each DiT "
                        "sharding mode that takes it (sequence takes a tp that does not divide the heads), and "
                        "rank them")
    if not stage2:
        g.add_argument("--compile_stages", nargs="+", default=list(STAGES), choices=STAGES, metavar="STAGE",
                       help="stages whose programs to compile (default: all; the others' weights still count "
                            "toward each device's memory). The VAE's convolutions take the TPU compiler "
                            "minutes each at real sizes")
    if stage2:
        g.add_argument("--num_prompts", type=int, default=None,
                       help="with --compile_only and no stage-1 folder: how many prompts the run has")
        g.add_argument("--model_id", default=None,
                       help="with --compile_only and no stage-1 folder: the model (default: %s)" % DEFAULT_MODEL_ID)


def check_compile_args(args: argparse.Namespace) -> None:
    """--topology / --compile_only / --search_mesh / --num_prompts / --export go together (--programs does not go with
    --compile_only); refused before jax is imported. --compile_only without --topology compiles for the attached
    devices (--cpu_devices N included)."""
    if args.export is not None and not args.compile_only:
        raise UsageError(f"--export {args.export}: expected --compile_only with it (it writes what a compile-only "
                         "run compiles)")
    if args.compile_only and getattr(args, "programs", None):
        raise UsageError(f"--programs {args.programs}: expected no --compile_only with it (a compile-only run "
                         "compiles every program; --export DIR writes them)")
    if args.topology and not args.compile_only:
        raise UsageError(f"--topology {args.topology}: expected --compile_only with it (runs use the attached devices)")
    if args.search_mesh and not args.compile_only:
        raise UsageError("--search_mesh: expected --compile_only --topology NAME with it")
    if args.search_mesh and (args.dp is not None or args.tp is not None):
        raise UsageError("--search_mesh: expected no --dp/--tp (it tries every mesh), found them")
    if args.compile_only and getattr(args, "distributed", False):
        raise UsageError("--compile_only: expected no --distributed (it compiles in one process)")
    if args.topology and getattr(args, "cpu_devices", None):
        raise UsageError(f"--topology {args.topology}: expected no --cpu_devices (the slice's devices are compiled "
                         "for; --cpu_devices N with --compile_only and no --topology compiles for N CPU devices)")
    num_prompts = getattr(args, "num_prompts", None)
    if num_prompts is not None and (not args.compile_only or num_prompts < 1):
        raise UsageError(f"--num_prompts: expected a count >= 1 with --compile_only, found {num_prompts}"
                         + ("" if args.compile_only else " without --compile_only"))
    if hasattr(args, "num_prompts") and args.model_id is not None and num_prompts is None:  # stage 2's flags
        raise UsageError("--model_id: expected --compile_only --num_prompts N with it (stage 2 reads the model "
                         "from the stage-1 folder)")


def finish_compile_only(metrics: dict, path) -> None:
    """Saves a compile-only run's metrics.json, prints its table, and raises (exit 3) if something does not fit."""
    from tpu_wan.core import artifacts
    from tpu_wan.run import aot

    artifacts.save_metrics(path, metrics)
    say(aot.table(metrics), f"metrics: {path}")
    why = aot.not_fitting(metrics)
    if why:
        raise DoesNotFit(why)


def add_stage1_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("text encoding (stage 1)")
    g.add_argument("--model_id", default=DEFAULT_MODEL_ID,
                   help="'tiny-random', a diffusers folder, or a hub id (default: %(default)s)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--prompt_file", default=None,
                   help="one prompt per line (UTF-8; blank lines and #-comments skipped); overrides --prompt")
    g.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT,
                   help="default: the Wan 2.1 model card's negative prompt")
    g.add_argument("--max_sequence_length", type=int, default=512)


def add_image_args(p: argparse.ArgumentParser, *, size: bool) -> None:
    """Image to video's stage-1 flags; `size`: with --height / --width / --frames (stage 1's own; generate_flax.py
    has stage 2's)."""
    g = p.add_argument_group("image to video (stage 1)")
    g.add_argument("--image", default=None, metavar="PATH",
                   help="the first frame (PNG, JPEG or WebP), resized to the video's size as diffusers' pipeline "
                        "does; for every prompt")
    g.add_argument("--image_file", default=None, metavar="FILE",
                   help="one image path per line, paired in order with --prompt_file's prompts; overrides --image")
    g.add_argument("--last_image", default=None, metavar="PATH",
                   help="the last frame too, where the model takes one (Wan 2.2 I2V-A14B)")
    if size:
        g.add_argument("--height", type=int, default=None, help="the video's height the image is encoded at "
                       "(default: the model's: 480 for I2V-14B-480P, 720 for -720P and I2V-A14B, 704 for TI2V-5B)")
        g.add_argument("--width", type=int, default=None, help="its width (default: 832, or 1280)")
        g.add_argument("--frames", type=int, default=None, help="its frame count, 4n+1 (default: 81, 121 for TI2V-5B)")


def images_from(args: argparse.Namespace, num_prompts: int) -> tuple[list[str] | None, list[str] | None]:
    """(an image path per prompt or None, a last-image path per prompt or None) from --image_file / --image and
    --last_image."""
    from tpu_wan.core.batch import read_lines

    if args.image_file:
        images = read_lines(args.image_file, "--image_file", "image path")
        if len(images) != num_prompts:
            raise UsageError(f"--image_file {args.image_file}: expected one image per prompt ({num_prompts}), found "
                             f"{len(images)}")
        base = Path(args.image_file).parent
        images = [str(base / p) if not Path(p).is_absolute() else p for p in images]  # relative to the list
    else:
        images = None if args.image is None else [args.image] * num_prompts
    lasts = None if args.last_image is None else [args.last_image] * num_prompts
    return images, lasts


def add_stage2_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("denoising (stage 2)")
    g.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (TI2V-5B: 32) (default: "
                   "the model's: 720 for 14B and A14B, 480 for 1.3B, 704 for TI2V-5B; image to video: the size stage "
                   "1 encoded the image at)")
    g.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (TI2V-5B: 32) (default: 1280, "
                   "832 for 1.3B)")
    g.add_argument("--frames", type=int, default=None, help="4n+1 (default: 81, 121 for TI2V-5B)")
    g.add_argument("--num_inference_steps", type=int, default=None, help="default: 50, 40 for A14B")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance (of the high-noise expert for A14B); <= 1 turns it off "
                        "(default: 5.0, 4.0 for A14B)")
    g.add_argument("--guidance_scale_2", type=float, default=None,
                   help="two-expert models (A14B): the low-noise expert's guidance (default: --guidance_scale if "
                        "given, else the model's: 3.0)")
    g.add_argument("--boundary_ratio", type=float, default=None,
                   help="two-expert models: the high-noise expert runs the steps with t >= this x 1000 (default: the "
                        "folder's model_index.json, 0.875 for A14B)")
    g.add_argument("--expert_offload", action="store_true",
                   help="two-expert models: keep only the running expert on the chips and the other in host memory, "
                        "swapped at the boundary step (when both do not fit in HBM together)")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED)
    g.add_argument("--seeds", nargs="+", default=None, metavar="SEED",
                   help="several seeds, e.g. 1 2 3 or 1-8: one video per (prompt, seed); overrides --seed")
    g.add_argument("--batch_size", type=int, default=None,
                   help="videos per denoising batch (default: what the dp axis holds)")
    g.add_argument("--flow_shift", type=float, default=None, help="default: the model's (A14B 12.0, TI2V-5B 5.0), "
                   "else 5.0 at 720p and up, 3.0 below")
    g.add_argument("--sample_solver", default=DEFAULT_SOLVER, choices=SOLVERS,
                   help="unipc, dpm++, euler: diffusers' schedulers; distill / distill_euler: lightx2v's "
                        "step-distilled samplers (re-noise / deterministic) over --denoising_steps, by default "
                        "1000 750 500 250 at --flow_shift 5.0 without CFG (guidance 1.0) (default: %(default)s)")
    g.add_argument("--init_latents", default=None, help="safetensors file with key 'latents' to start from")
    g.add_argument("--transformer_checkpoint", default=None,
                   help="fine-tuned transformer weights (.safetensors, or .pt/.pth read weights-only) over the base")
    g.add_argument("--checkpoint_key", default=None, help="key of the weights inside a .pt file, e.g. generator_ema")
    g.add_argument("--lora", dest="loras", action="append", default=None, metavar="PATH[:SCALE]",
                   help="a LoRA .safetensors (diffusers/PEFT, original Wan as lightx2v/Kijai/ComfyUI write it, or "
                        "kohya/musubi keys) fused into the weights at load, scaled (default 1.0); repeatable")
    g.add_argument("--lora_2", dest="loras_2", action="append", default=None, metavar="PATH[:SCALE]",
                   help="two-expert models: a LoRA for the low-noise expert (transformer_2); repeatable")
    g.add_argument("--denoising_steps", type=int, nargs="+", default=None, metavar="T",
                   help="--sample_solver distill / distill_euler: the training timesteps of the steps, e.g. 1000 750 "
                        "500 250 (the list sets the step count)")
    g.add_argument("--cache", default=None, metavar="KIND:THRESHOLD",
                   help="step caching for full-step runs, as diffusers' hooks: first_block:0.05 (First Block Cache), "
                        "mag:0.06:R1,R2,...[:MAX_SKIP_STEPS[:RETENTION_RATIO]] (MagCache with the model's magnitude "
                        "ratios) or mag:calibrate (measures them into metrics.json)")
    g.add_argument("--non_strict", action="store_true",
                   help="apply the fine-tuned weights that fit; report missing/unexpected/mis-shaped ones")
    g.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="auto: our exp2 kernel on TPU for every call (self- and cross-attention), cuDNN on a GPU "
                        "in bf16/fp16 with head dim <= 128, XLA otherwise (CPU); custom / splash: the Pallas TPU "
                        "kernels; cudnn: jax's cuDNN attention (GPU)")
    g.add_argument("--k_smooth", action="store_true",
                   help="subtract the mean key first (exact in real arithmetic: helps float32 when keys share a "
                        "large mean, costs bf16 one more rounding of the keys); our kernel only (auto, custom)")
    g.add_argument("--window_size", type=int, default=None, help="local self-attention window (default: global)")
    g.add_argument("--bqsize", type=int, default=None,
                   help="kernel query block (default: per shape); the block flags: auto, custom, splash only")
    g.add_argument("--bkvsize", type=int, default=None, help="kernel key/value block (default: per shape)")
    g.add_argument("--bkvcomputesize", type=int, default=None, help="kernel key compute block (default: per shape)")
    g.add_argument("--sharding", default="auto", choices=SHARDING_CHOICES,
                   help="how the DiT splits over the mesh: megatron (weights split, activations whole on each tp "
                        "chip), sequence (tokens split, weights gathered per block, all-to-all around attention), "
                        "auto: the one moving fewer bytes per step for this model, size and mesh")
    g.add_argument("--warmup_steps", type=int, default=0, help="steps run first to compile (not saved)")


def attention_options(args: argparse.Namespace) -> AttentionOptions:
    """The --attention / --k_smooth / --window_size / block-size flags as one value."""
    return AttentionOptions(choice=args.attention, k_smooth=args.k_smooth, window_size=args.window_size,
                            bq=args.bqsize, bkv=args.bkvsize, bkv_compute=args.bkvcomputesize)


def stage2_settings(args: argparse.Namespace) -> Stage2Settings:
    """The stage-2 flags as one value (--seeds, else --seed), checked as it is built (Stage2Settings): the scripts
    call it first, so a bad flag is refused before jax is imported or a model loads."""
    from tpu_wan.core.batch import parse_seeds

    if args.warmup_steps < 0:  # a run option that comes with the stage-2 flags
        raise UsageError(f"--warmup_steps must be >= 0, found {args.warmup_steps}")
    decided = ("seeds", "attention", "mesh", "expert_steps", "expand_timesteps", "vae")  # not flags
    flags = [f.name for f in dataclasses.fields(Stage2Settings) if f.name not in decided]
    seeds = parse_seeds(args.seeds) if args.seeds else [args.seed]
    values = {name: getattr(args, name) for name in flags}
    for name, flag in (("loras", "--lora"), ("loras_2", "--lora_2")):
        if values[name] is not None:
            values[name] = tuple(LoraFile.parse(text, flag) for text in values[name])
    if values["denoising_steps"] is not None:
        values["denoising_steps"] = tuple(values["denoising_steps"])
    return Stage2Settings(seeds=tuple(seeds), attention=attention_options(args), **values)


def prompts_from(args: argparse.Namespace) -> list[str]:
    """--prompt_file's prompts, else [--prompt]."""
    from tpu_wan.core.batch import read_prompt_file

    return read_prompt_file(args.prompt_file) if args.prompt_file else [args.prompt]


def add_vae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae_dtype", default="float32", choices=DTYPES,
                   help="VAE decoder dtype: float32 matches diffusers exactly, bfloat16 is faster on TPU")
    p.add_argument("--vae_conv", default="auto", choices=("auto", "xla", "pallas"),
                   help="the VAE's convolutions: auto (the Pallas kernel on TPU, which compiles ~10x faster; XLA's "
                        "elsewhere), xla or pallas")


def add_preview_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preview", action="store_true",
                   help="also write <video>.png beside each video: a contact sheet of 8 evenly spaced frames")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="model dtype (default: bfloat16 on TPU/GPU, float32 on CPU)")


def setup_process(args: argparse.Namespace) -> None:
    """Process-wide settings, before jax is imported: virtual CPU devices, logging, quiet third parties."""
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = with_cpu_xla_flags(os.environ.get("XLA_FLAGS", ""))
    if getattr(args, "programs", None):  # refused before jax is imported
        from tpu_wan.runtime import programs

        programs.check_folder(args.programs)
    local = hasattr(args, "topology") and args.topology is None  # --compile_only for the attached devices
    if getattr(args, "compile_only", False) and not local:
        # Compiling for a slice (tpu_wan.tpu.topology) needs no device: the host's CPU backend alone, whatever is
        # attached.
        os.environ["JAX_PLATFORMS"] = "cpu"
    if getattr(args, "cpu_devices", None):
        if "jax" in sys.modules:
            raise RuntimeError("--cpu_devices must be applied before jax is imported")
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.cpu_devices}".strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read once, when jax loads (in the next line)
    _setup_compilation_cache(args)
    _setup_logging(getattr(args, "log_level", "INFO"))
    # Read by the libraries when they are imported (later, and only if needed: a refused run never pays for them).
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    # imageio-ffmpeg starts ffmpeg with fork+exec; the child execs at once and touches no jax state.
    warnings.filterwarnings("ignore", message="os.fork\\(\\) was called")
    from tpu_wan.runtime import distributed

    flags = [getattr(args, f, None) for f in ("coordinator_address", "num_processes", "process_id")]
    if distributed.check_flags(getattr(args, "distributed", False), *flags):
        distributed.initialize(*flags)
    _start_backend()
    from tpu_wan.runtime import programs

    programs.use(getattr(args, "programs", None))


def _setup_logging(level_name: str) -> None:
    """--log_level sets the project's logger; the libraries' loggers stay at WARNING (their INFO lines are noise
    to a user) unless DEBUG asks for everything or ERROR for less."""
    level = getattr(logging, level_name)
    libraries = level if level == logging.DEBUG else max(level, logging.WARNING)
    logging.basicConfig(level=libraries, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tpu_wan").setLevel(level)


def _start_backend() -> None:
    """Starts jax's backend (after jax.distributed, which must come first) and names the one that runs in the
    first line of the run's log: TPU, GPU or the CPU, and why the CPU where libtpu is installed. What the plugins
    print while they look for their chips (libtpu complains on every host without a TPU) is kept off the terminal
    and logged at DEBUG; a platform asked for by JAX_PLATFORMS that cannot start is one line (UsageError), not a
    traceback."""
    import importlib.util

    import jax

    asked = os.environ.get("JAX_PLATFORMS") or ""
    with _CapturedStderr() as noise:
        try:
            devices = jax.devices()
        except RuntimeError as err:
            raise UsageError(f"JAX_PLATFORMS={asked}: expected that backend to start, found: "
                             f"{' '.join(str(err).split())[:300]}") from None
    if noise.text:
        log.debug("while jax looked for its backends: %s", " | ".join(noise.text.splitlines()))
    backend = jax.default_backend()
    why = ""
    if backend == "cpu":
        if asked:
            why = f" (JAX_PLATFORMS={asked})"
        elif importlib.util.find_spec("libtpu") is not None:
            why = " (no TPU or GPU found on this host; libtpu is installed but found no chip)"
        else:
            why = " (no TPU or GPU found on this host)"
    # The first line of the run's log, put in front of its first record: a run refused before it logs anything
    # still ends in the one line of its error.
    log.addFilter(_LeadingLine(f"backend {backend}: {len(devices)} x {devices[0].device_kind}{why}"))


class _LeadingLine(logging.Filter):
    """Logs `line` just before the first record the tpu_wan logger passes on, once."""

    def __init__(self, line: str):
        super().__init__()
        self.line = line

    def filter(self, record: logging.LogRecord) -> bool:
        log.removeFilter(self)
        log.info(self.line)  # handled now, before the record this filter was asked about
        return True


class _CapturedStderr:
    """Inside `with`, whatever is written to file descriptor 2 (C++ libraries' logs included) goes to a temporary
    file instead of the terminal; `.text` holds it afterwards."""

    text = ""

    def __enter__(self):
        sys.stderr.flush()
        self._saved, self._sink = os.dup(2), tempfile.TemporaryFile()
        os.dup2(self._sink.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._sink.seek(0)
        self.text = self._sink.read().decode(errors="replace").strip()
        self._sink.close()


# Programs that compile faster than this are not worth a disk round trip (jax's default is 1 s, which would leave
# out every program of small models; the step programs of real models take tens of seconds).
CACHE_MIN_COMPILE_SECONDS = 0.2


def compilation_cache_dir(args: argparse.Namespace) -> str | None:
    """Where the persistent compilation cache lives for these flags; None when it is off."""
    from tpu_wan.core.config import cache_root

    if getattr(args, "no_compilation_cache", False) or getattr(args, "compile_only", False):
        return None  # compile-only runs time the compiler: nothing comes from a cache
    given = getattr(args, "compilation_cache_dir", None) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return given or str(cache_root() / "jax_compilation_cache")


def _setup_compilation_cache(args: argparse.Namespace) -> None:
    import jax

    folder = compilation_cache_dir(args)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
    jax.config.update("jax_enable_compilation_cache", folder is not None)


def say(*lines: str) -> None:
    """Prints the script's summary lines: from process 0 only in a multi-process run."""
    from tpu_wan.runtime import distributed

    if distributed.is_primary():
        print(*lines, sep="\n")


