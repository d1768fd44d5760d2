"""Stage 3: decode the latents with the Wan VAE and write the video.

    python stages/stage3_vae_decoder.py [--input_dir stage_outputs] [--output_video out.mp4]

reads stage_outputs/stage2_latents.safetensors, writes stage_outputs/output_video.mp4 (H.264; for a sweep,
<prompt-slug>_seed<seed>.mp4 per video) and, with
--save_frames, stage_outputs/stage3_frames.safetensors (frames: [V, T, Hp, Wp, 3] float32 in [0, 1]).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpu_wan import cli  # noqa: E402


def main(argv=None):
    parser = cli.make_parser(__doc__)
    parser.add_argument("--input_dir", default=cli.DEFAULT_OUTPUT_DIR)
    parser.add_argument("--output_video", default=None, help="one video: default <input_dir>/output_video.mp4")
    parser.add_argument("--output_dir", default=None, help="several videos: <prompt-slug>_seed<seed>.mp4 here "
                        "(default: --input_dir)")
    parser.add_argument("--fps", type=int, default=None, help="default: from the config, else 16")
    parser.add_argument("--save_frames", action="store_true", help="also write the float frames losslessly")
    cli.add_preview_arg(parser)
    cli.add_vae_args(parser)
    cli.add_mesh_args(parser)
    args = parser.parse_args(argv)
    if args.fps is not None and args.fps <= 0:
        raise cli.UsageError(f"--fps must be > 0, found {args.fps}")
    cli.setup_process(args)
    from tpu_wan.run import pipeline
    from tpu_wan.runtime import profiling

    result = pipeline.run_stage3(
        args.input_dir, output_video=args.output_video, output_dir=args.output_dir, fps=args.fps,
        save_frames=args.save_frames, vae_dtype=args.vae_dtype, vae_conv=args.vae_conv, dp=args.dp, tp=args.tp,
        preview=args.preview,
    )
    cli.say(profiling.table(result.metrics, only="vae"))
    cli.say("stage 3: " + ", ".join(str(p) for p in result.videos))


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
