"""Stage 1: encode the prompt and negative prompt with UMT5.

    python stages/stage1_text_encoder.py --model_id tiny-random --prompt "A cat playing piano"
    python stages/stage1_text_encoder.py --model_id tiny-random --prompt_file prompts.txt

writes stage_outputs/stage1_embeddings.safetensors (prompt_embeds, negative_prompt_embeds: [P, 512, Et]) and
stage_outputs/generation_config.json. Encode once, then run stage 2 as often as you like.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpu_wan import cli  # noqa: E402


def main(argv=None):
    parser = cli.make_parser(__doc__)
    cli.add_stage1_args(parser)
    parser.add_argument("--output_dir", default=cli.DEFAULT_OUTPUT_DIR)
    cli.add_dtype_arg(parser)
    cli.add_mesh_args(parser)
    args = parser.parse_args(argv)
    prompts = cli.prompts_from(args)
    cli.setup_process(args)
    from tpu_wan.run import pipeline
    from tpu_wan.runtime import profiling

    result = pipeline.run_stage1(
        args.model_id, prompts, args.negative_prompt, args.output_dir,
        max_sequence_length=args.max_sequence_length, dtype=args.dtype, dp=args.dp, tp=args.tp,
    )
    cfg = result.config
    cli.say(profiling.table(result.metrics, only="text_encoder"))
    cli.say(f"stage 1: {len(cfg.prompts)} prompt(s) encoded ({cfg.text_dtype}) -> {args.output_dir}")


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
