"""Text (or image) to video in one process: encode -> denoise -> decode, with a warmup run and per-stage timing.

    python generate_flax.py --model_id tiny-random --height 32 --width 32 --frames 5 --num_inference_steps 4
    python generate_flax.py --model_id tiny-random-i2v --image cat.png --height 32 --width 48 --frames 9

loads the three models once, runs --warmup_steps denoising steps end to end (this compiles every program),
then --num_iterations timed runs; prints a per-stage table (load, compile, run, s/step, memory), writes it to
metrics.json beside the video (render it with `python -m tpu_wan.core.report metrics.json`), and writes the video
to --output_video (default: YYYYMMDD_HHMMSS.mp4). --profile DIR traces the last timed run with the jax
profiler; --save_intermediates DIR also writes the stage files, as the stage scripts do.

    python generate_flax.py --model_id Wan-AI/Wan2.1-T2V-14B-Diffusers --height 720 --width 1280 --frames 81 \
        --topology v6e-8 --compile_only [--search_mesh]

compiles every program of that run for a v6e-8 slice on this host (no TPU, no weights, no download), prints
what each needs per chip against HBM, its FLOPs and collectives, writes metrics.json, and exits 3 if
something does not fit. --export DIR also writes each compiled program into DIR; a later run with the same
settings given --programs DIR loads them instead of compiling (without --topology, --compile_only compiles for
this host's own devices, e.g. --cpu_devices 8).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tpu_wan import cli  # noqa: E402


def main(argv=None):
    parser = cli.make_parser(__doc__)
    cli.add_stage1_args(parser)
    cli.add_image_args(parser, size=False)
    cli.add_stage2_args(parser)
    parser.set_defaults(warmup_steps=2)
    cli.add_dtype_arg(parser)
    parser.add_argument("--fps", type=int, default=None, help="default: the model's (16, 24 for TI2V-5B)")
    parser.add_argument("--output_video", default=None, help="one video: default YYYYMMDD_HHMMSS.mp4")
    parser.add_argument("--output_dir", default=None, help="several videos: <prompt-slug>_seed<seed>.mp4 here "
                        "(default: YYYYMMDD_HHMMSS/)")
    parser.add_argument("--save_intermediates", default=None, metavar="DIR", help="also write the stage files here")
    parser.add_argument("--num_iterations", type=int, default=1, help="timed runs after the warmup (default: 1)")
    parser.add_argument("--profile", default=None, metavar="DIR", help="jax profiler trace of the last timed run")
    parser.add_argument("--metrics", default=None, metavar="PATH",
                        help="default: metrics.json in the folder the videos go to")
    cli.add_preview_arg(parser)
    cli.add_vae_args(parser)
    cli.add_mesh_args(parser)
    cli.add_compile_args(parser)
    args = parser.parse_args(argv)
    settings = cli.stage2_settings(args)
    cli.check_compile_args(args)
    if args.num_iterations < 1:
        raise cli.UsageError(f"--num_iterations must be >= 1, found {args.num_iterations}")
    prompts = cli.prompts_from(args)
    images, last_images = cli.images_from(args, len(prompts))
    cli.setup_process(args)
    from tpu_wan.core import artifacts
    from tpu_wan.run import oneshot
    from tpu_wan.runtime import profiling

    stamp = time.strftime("%Y%m%d_%H%M%S")
    if args.compile_only:
        from tpu_wan.core.config import GenerationConfig
        from tpu_wan.run import aot

        base = GenerationConfig(model_id=args.model_id, prompts=tuple(prompts), negative_prompt=args.negative_prompt,
                                max_sequence_length=args.max_sequence_length,
                                fps=16 if args.fps is None else args.fps,
                                vae_dtype=args.vae_dtype)
        metrics = aot.compile_only(base, settings, args.topology, dp=args.dp, tp=args.tp, one_process=True,
                                   compile_stages=tuple(args.compile_stages), uint8=not args.save_intermediates,
                                   search_mesh=args.search_mesh, expert_offload=args.expert_offload,
                                   export=args.export, vae_conv=args.vae_conv,
                                   images=bool(args.image or args.image_file))
        folder = Path(args.output_dir or (Path(args.output_video).parent if args.output_video else "."))
        return cli.finish_compile_only(metrics, args.metrics or folder / artifacts.METRICS_FILE)
    several = len(prompts) * len(settings.seeds) > 1
    output_video = args.output_video or (None if several else f"{stamp}.mp4")
    result = oneshot.generate(
        args.model_id, prompts, args.negative_prompt, settings,
        max_sequence_length=args.max_sequence_length, fps=args.fps, vae_dtype=args.vae_dtype,
        vae_conv=args.vae_conv, dp=args.dp, tp=args.tp,
        warmup_steps=args.warmup_steps, output_video=output_video,
        output_dir=args.output_dir or (stamp if several else None),
        save_intermediates=args.save_intermediates, num_iterations=args.num_iterations, profile_dir=args.profile,
        preview=args.preview, non_strict=args.non_strict, expert_offload=args.expert_offload,
        images=images, last_images=last_images,
    )
    metrics_path = Path(args.metrics or result.videos[0].parent / artifacts.METRICS_FILE)
    artifacts.save_metrics(metrics_path, result.metrics)
    cli.say(profiling.table(result.metrics))
    step = result.metrics["stages"]["transformer"]["s_per_step"]
    cli.say(f"{step:.4f} s/step (median; batches of {result.config.stage2.batch_size} video(s), "
          f"{result.config.stage2.num_inference_steps} steps)")
    cli.say(f"time to first step: {result.metrics['time_to_first_step_s']:.1f} s (process start to the end of the "
            f"first denoising step: loading, encoding and compiling included)")
    cli.say(f"metrics: {metrics_path}")
    cli.say("video: " + ", ".join(str(p) for p in result.videos))


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
