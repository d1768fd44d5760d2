"""Stage 2: denoise latents with the Wan DiT on the ('dp', 'tp') mesh.

    python stages/stage2_transformer.py --height 480 --width 832 --frames 81 --num_inference_steps 50

reads stage_outputs/stage1_embeddings.safetensors and generation_config.json, writes
stage_outputs/stage2_latents.safetensors (latents: [V, 16, (frames-1)/4+1, height/8, width/8]) and adds every
setting it used to the config. --seeds 1-8 makes one video per (prompt, seed) in batches with one compilation,
saved to stage_outputs/stage2_latents/<prompt-slug>_seed<seed>.safetensors as each batch lands; rerunning
the same command resumes where a crash stopped it. Same seed, same bytes.

    python stages/stage2_transformer.py --topology v5e-8 --compile_only [--num_prompts 4 --model_id ...]

compiles the denoising step of that run for a v5e-8 slice on this host (the stage-1 folder, or --num_prompts,
gives the prompts), writes <folder>/metrics.json, and exits 3 if it does not fit.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpu_wan import cli  # noqa: E402


def main(argv=None):
    parser = cli.make_parser(__doc__)
    parser.add_argument("--input_dir", default=cli.DEFAULT_OUTPUT_DIR)
    parser.add_argument("--output_dir", default=None, help="default: --input_dir")
    cli.add_stage2_args(parser)
    parser.add_argument("--overwrite", action="store_true", help="redo videos already in --output_dir")
    cli.add_dtype_arg(parser)
    cli.add_mesh_args(parser)
    cli.add_compile_args(parser, stage2=True)
    args = parser.parse_args(argv)
    settings = cli.stage2_settings(args)
    cli.check_compile_args(args)
    cli.setup_process(args)
    from tpu_wan.run import pipeline
    from tpu_wan.runtime import profiling

    if args.compile_only:
        from tpu_wan.core import artifacts
        from tpu_wan.run import aot

        base = aot.stage2_base(args.input_dir, args.num_prompts, args.model_id)
        metrics = aot.compile_only(base, settings, args.topology, dp=args.dp, tp=args.tp,
                                   stages=("transformer",), search_mesh=args.search_mesh,
                                   expert_offload=args.expert_offload, export=args.export)
        folder = Path(args.output_dir or args.input_dir)
        return cli.finish_compile_only(metrics, folder / artifacts.METRICS_FILE)

    result = pipeline.run_stage2(
        args.input_dir, settings, output_dir=args.output_dir,
        dp=args.dp, tp=args.tp, warmup_steps=args.warmup_steps,
        overwrite=args.overwrite, non_strict=args.non_strict, expert_offload=args.expert_offload,
    )
    cfg = result.config
    if result.metrics:
        cli.say(profiling.table(result.metrics, only="transformer"))
    videos = len(cfg.prompts) * len(cfg.stage2.seeds)
    cli.say(f"stage 2: {videos} video(s), {cfg.stage2.num_inference_steps} steps at {cfg.stage2.video_size}, "
          f"seeds {list(cfg.stage2.seeds)} -> {args.output_dir or args.input_dir}")


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
