"""Stage 2: denoise latents with the Wan DiT on the ('dp', 'tp') mesh.

    python stages/stage2_transformer.py --height 480 --width 832 --frames 81 --num_inference_steps 50

reads stage_outputs/stage1_embeddings.safetensors and generation_config.json, writes
stage_outputs/stage2_latents.safetensors (latents: [N, 16, (frames-1)/4+1, height/8, width/8]) and adds every
setting it used to the config. --seeds 1-8 makes one video per (prompt, seed) in batches with one compilation,
saved to stage_outputs/stage2_latents/<prompt-slug>_seed<seed>.safetensors as each batch lands; rerunning
the same command resumes where a crash stopped it. Same seed, same bytes.
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
    args = parser.parse_args(argv)
    cli.check_stage2_args(args)
    cli.setup_process(args)
    from tpu_wan import pipeline, profiling

    result = pipeline.run_stage2(
        args.input_dir, pipeline.sampling_args(args), output_dir=args.output_dir,
        dp=args.dp, tp=args.tp, attention=pipeline.attention_options(args), warmup_steps=args.warmup_steps,
        overwrite=args.overwrite,
    )
    cfg = result.config
    if result.metrics:
        cli.say(profiling.table(result.metrics, only="transformer"))
    videos = len(cfg.prompts) * len(cfg.seeds)
    cli.say(f"stage 2: {videos} video(s), {cfg.num_inference_steps} steps at {cfg.width}x{cfg.height}x{cfg.frames}, "
          f"seeds {list(cfg.seeds)} -> {args.output_dir or args.input_dir}")


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
