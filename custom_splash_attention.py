"""Check, time and tune the exp2 splash attention kernel.

    python custom_splash_attention.py check --heads 4 --q_len 300 --kv_len 300 --head_dim 128 --dtype bfloat16 \
        --block_q 128 --block_kv 256 --block_kv_compute 128 [--window_size W] [--k_smooth] [--seed S] [--json]
    python custom_splash_attention.py bench --heads 40 --q_len 75600 --kv_len 75600 --head_dim 128
    python custom_splash_attention.py sweep --heads 40 --q_len 75600 --kv_len 75600 --head_dim 128

check: kernel vs a float64 host reference (max_abs_err, rel_err). bench: our kernel vs upstream splash vs XLA,
median of repeats, TFLOP/s and fraction of peak. sweep: block sizes for a shape, fastest first. Without a TPU
the kernels run in Pallas interpret mode: correct, but not a speed measurement. --json prints one JSON object.
"""

import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tpu_wan import cli  # noqa: E402

SWEEP_BQ = (512, 1024, 1560, 2048, 2520, 3328)
SWEEP_BKV = (512, 1024, 2048, 2816, 4096)
SWEEP_BKV_COMPUTE = (256, 512, 1024)


def _parser():
    parser = cli.make_parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
    for name in ("check", "bench", "sweep"):
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
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _table(rows):
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(k), *(len(fmt(r[k])) for r in rows)) for k in keys]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(fmt(r[k]).ljust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def main(argv=None):
    args = _parser().parse_args(argv)
    cli.setup_process(args)
    from tpu_wan import attention_tuning as tuning
    from tpu_wan.attention import AttentionOptions

    shape = tuning.Shape(args.heads, args.q_len, args.kv_len, args.head_dim, args.dtype)
    options = AttentionOptions(
        choice="custom", k_smooth=args.k_smooth, window_size=args.window_size,
        bq=args.block_q, bkv=args.block_kv, bkv_compute=args.block_kv_compute,
    )
    if args.command == "check":
        result = tuning.check(shape, options, seed=args.seed)
        rows = [result]
    elif args.command == "bench":
        rows = tuning.bench(shape, options, repeats=args.repeats)
        result = {"shape": vars(shape), "results": rows}
    else:
        candidates = itertools.product(SWEEP_BQ, SWEEP_BKV, SWEEP_BKV_COMPUTE)
        rows = tuning.sweep(shape, options, candidates, repeats=args.repeats)
        result = {"shape": vars(shape), "results": rows, "best": rows[0] if rows else None}
    print(json.dumps(result) if args.json else _table(rows))


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
