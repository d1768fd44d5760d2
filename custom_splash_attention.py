"""Check, time and tune the exp2 splash attention kernel.

    python custom_splash_attention.py check --heads 4 --q_len 300 --kv_len 300 --head_dim 128 --dtype bfloat16 \
        --block_q 128 --block_kv 256 --block_kv_compute 128 [--window_size W] [--k_smooth] [--seed S] \
        [--repeats N] [--json]
    python custom_splash_attention.py bench --heads 40 --q_len 75600 --kv_len 75600 --head_dim 128 \
        [--choices custom splash xla cudnn]
    python custom_splash_attention.py sweep --heads 10 --q_len 75600 --kv_len 75600 --head_dim 128 \
        [--bq_choices 1024 2048 --bkv_choices 512 1024 --bkv_compute_choices 512]
    python custom_splash_attention.py compile --topology v6e-8 --heads 10 --q_len 75600 --kv_len 75600 \
        --head_dim 128 [--block_q 2048 ...] [--attention splash] [--llo_stats] [--json]

check: kernel vs a float64 host reference (max_abs_err, rel_err: the worst over --repeats inputs); without a TPU
(GPU included) the kernel runs in Pallas interpret mode on the host CPU. bench: median of --repeats calls, TFLOP/s
(of the attended pairs: a window counts only its own) and fraction of peak for what the backend runs (TPU: our
kernel, upstream splash, XLA; GPU: XLA and cuDNN; CPU: all but cuDNN, the kernels interpreted: correct, not a speed
measurement), listing what it skipped and why. sweep: block sizes for a shape, fastest first, the best marked, with
the stage 2 flags that apply it. compile: the kernel (ours, or upstream's with --attention splash) compiled by the
TPU compiler (Mosaic) for one chip of the slice, on any host: compile seconds, XLA's memory analysis and FLOPs, the
VMEM estimate and limit, grid steps per head (--llo_stats: the vector ops and MXU pushes of one grid step in
Mosaic's LLO); exit 1 with Mosaic's error in one line if it refuses. --json prints one JSON object.
"""

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tpu_wan import cli  # noqa: E402

SWEEP_BQ = (512, 1024, 1560, 2048, 2520, 3328)
SWEEP_BKV = (512, 1024, 2048, 2816, 4096)
SWEEP_BKV_COMPUTE = (256, 512, 1024)
BENCH_CHOICES = ("custom", "splash", "xla", "cudnn")  # attention_tuning.BENCH_CHOICES (not imported before jax)


def _count(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a count >= 1, found {value}")
    return value


def _parser():
    parser = cli.make_parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
    for name in ("check", "bench", "sweep", "compile"):
        p = sub.add_parser(name)
        p.add_argument("--heads", type=int, default=40)
        p.add_argument("--q_len", type=int, default=4096)
        p.add_argument("--kv_len", type=int, default=4096)
        p.add_argument("--head_dim", type=int, default=128)
        p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
        p.add_argument("--block_q", type=int, default=None)
        p.add_argument("--block_kv", type=int, default=None)
        p.add_argument("--block_kv_compute", type=int, default=None)
        p.add_argument("--window_size", type=int, default=None)
        p.add_argument("--k_smooth", action="store_true")
        if name != "compile":  # compiling needs no inputs and times nothing
            p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (check: of the first)")
        if name == "check":
            p.add_argument("--repeats", type=_count, default=1, metavar="N",
                           help="check N random inputs, seeded --seed, --seed + 1, ...: the worst errors, and the "
                                "seed of the worst rel_err (default: 1)")
        elif name != "compile":
            p.add_argument("--repeats", type=_count, default=5, metavar="N",
                           help="timed calls after the compile-and-run: their median (default: 5)")
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        if name == "bench":
            p.add_argument("--choices", nargs="+", default=list(BENCH_CHOICES), choices=BENCH_CHOICES,
                           help="what to time (default: all; those the backend cannot run are listed as skipped)")
        if name == "compile":
            p.add_argument("--topology", required=True, metavar="NAME",
                           help="the TPU slice whose chip to compile for (v5e-8, v6e-8, v5p-8, ...): no TPU needed")
            p.add_argument("--attention", default="custom", choices=("custom", "splash"),
                           help="the kernel to compile: ours (custom, default) or upstream's splash attention")
            p.add_argument("--llo_stats", action="store_true",
                           help="count the vector ops (multiplies, exp2/exp, adds, maxima) and MXU pushes of one "
                                "grid step in Mosaic's LLO; needs a fresh process (Mosaic's dump is set before "
                                "libtpu starts)")
        if name == "sweep":
            for flag, values in (("bq", SWEEP_BQ), ("bkv", SWEEP_BKV), ("bkv_compute", SWEEP_BKV_COMPUTE)):
                p.add_argument(f"--{flag}_choices", type=int, nargs="+", default=list(values), metavar="N",
                               help=f"candidate {flag} values (default: {' '.join(map(str, values))})")
    return parser


class KernelRejected(cli.UserError):
    """The TPU compiler (Mosaic) refused the kernel at these settings."""

    exit_status = 1


def _table(rows):
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(k), *(len(fmt(r[k])) for r in rows)) for k in keys]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(fmt(r[k]).ljust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def main(argv=None):
    args = _parser().parse_args(argv)
    args.compile_only = args.command == "compile"  # the host's CPU backend is all compiling for a TPU needs
    dump_dir = None
    if getattr(args, "llo_stats", False):  # before libtpu starts: it reads its flags once
        import tempfile

        dump_dir = tempfile.mkdtemp(prefix="tpu-wan-llo-")
        os.environ["LIBTPU_INIT_ARGS"] = f"{os.environ.get('LIBTPU_INIT_ARGS', '')} --xla_mosaic_dump_to={dump_dir}"
    cli.setup_process(args)
    from tpu_wan.run import attention_tuning as tuning
    from tpu_wan.runtime.attention import AttentionOptions

    shape = tuning.Shape(args.heads, args.q_len, args.kv_len, args.head_dim, args.dtype)
    options = AttentionOptions(
        choice=getattr(args, "attention", "custom"), k_smooth=args.k_smooth, window_size=args.window_size,
        bq=args.block_q, bkv=args.block_kv, bkv_compute=args.block_kv_compute,
    )
    if args.command == "check":
        result = tuning.check(shape, options, seed=args.seed, repeats=args.repeats)
        rows, lines = [result], []
    elif args.command == "bench":
        rows, skipped = tuning.bench(shape, options, choices=args.choices, repeats=args.repeats, seed=args.seed)
        result = {"shape": vars(shape), "window_size": args.window_size, "seed": args.seed, "results": rows,
                  "skipped": skipped}
        lines = [f"skipped {r['attention']}: {r['reason']}" for r in skipped]
    elif args.command == "compile":
        result = tuning.compile_for(shape, options, args.topology)
        rows, lines = [{k: v for k, v in result.items() if k not in ("custom_calls", "error")}], []
        if dump_dir is not None and result["accepted"]:
            import shutil

            result["llo_per_grid_step"] = tuning.llo_stats(dump_dir)
            shutil.rmtree(dump_dir, ignore_errors=True)
            lines.append("LLO ops per grid step: " + " ".join(f"{k} {v}" for k, v in result["llo_per_grid_step"].items()))
        if not result["accepted"]:
            print(json.dumps(result) if args.json else _table(rows))
            raise KernelRejected(f"{args.topology} refused the {args.attention} kernel at {args.heads} x {args.q_len} "
                                 f"x {args.kv_len} x {args.head_dim} with blocks {result['block_sizes']}: "
                                 f"{result['error']}")
    else:
        candidates = itertools.product(args.bq_choices, args.bkv_choices, args.bkv_compute_choices)
        rows, refused = tuning.sweep(shape, options, candidates, repeats=args.repeats, seed=args.seed)  # none: error
        best = rows[0]
        result = {"shape": vars(shape), "window_size": args.window_size, "seed": args.seed, "results": rows,
                  "best": best, "refused": refused}
        rows = [{"best": "*" if r is best else "", **r} for r in rows]
        lines = [f"refused ({r['bq']}, {r['bkv']}, {r['bkv_compute']}): {r['reason']}" for r in refused]
        lines.append(f"best: --bqsize {best['bq']} --bkvsize {best['bkv']} --bkvcomputesize {best['bkv_compute']} "
                     "(stage 2 / generate_flax.py flags)")
    print(json.dumps(result) if args.json else "\n".join([_table(rows), *lines]))


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
