"""Stage 1: encode the prompt and negative prompt with UMT5 (and for image to video, the image).

    python stages/stage1_text_encoder.py --model_id tiny-random --prompt "A cat playing piano"
    python stages/stage1_text_encoder.py --model_id tiny-random --prompt_file prompts.txt
    python stages/stage1_text_encoder.py --model_id tiny-random-i2v --prompt "The cat looks up" --image cat.png

writes stage_outputs/stage1_embeddings.safetensors (prompt_embeds, negative_prompt_embeds: [P, 512, Et]; with an
image also image_condition and, for Wan 2.1 I2V, image_embeds) and stage_outputs/generation_config.json. Encode
once, then run stage 2 as often as you like.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpu_wan import cli  # noqa: E402


def main(argv=None):
    parser = cli.make_parser(__doc__)
    cli.add_stage1_args(parser)
    cli.add_image_args(parser, size=True)
    parser.add_argument("--output_dir", default=cli.DEFAULT_OUTPUT_DIR)
    cli.add_dtype_arg(parser)
    cli.add_mesh_args(parser)
    args = parser.parse_args(argv)
    prompts = cli.prompts_from(args)
    images, last_images = cli.images_from(args, len(prompts))
    cli.setup_process(args)
    from tpu_wan.run import pipeline
    from tpu_wan.runtime import profiling

    result = pipeline.run_stage1(
        args.model_id, prompts, args.negative_prompt, args.output_dir,
        max_sequence_length=args.max_sequence_length, dtype=args.dtype, dp=args.dp, tp=args.tp,
        images=images, last_images=last_images, size=(args.height, args.width, args.frames),
    )
    cfg = result.config
    cli.say(profiling.table(result.metrics, only="text_encoder"))
    size = "" if cfg.image_size is None else "{1}x{0}x{2}".format(*cfg.image_size)  # WxHxF
    what = f"{len(cfg.prompts)} prompt(s)" + (f" and their image(s) at {size}" if size else "")
    cli.say(f"stage 1: {what} encoded ({cfg.text_dtype}) -> {args.output_dir}")


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
