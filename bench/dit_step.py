"""python bench/dit_step.py [--repeats 5] [--attention auto] [--cache DIR] [--smoke] [--write]

Time one denoising step of a medium Wan DiT: ours (tpu_wan.models.transformer.Denoiser's jitted step, the program
stage 2 runs every step: CFG pair as one batch of 2, guidance combine, UniPC update; 1x1 mesh) against
diffusers' WanTransformer3DModel in torch eager in the same process (torch.no_grad, the same forward on a batch
of 2 plus the CFG combine), in float32 and in bfloat16.

Medium config: the real Wan 2.1 1.3B transformer config (bench/real_size.py) with 4 layers, 12 heads x 64
(dim 768) and ffn_dim 3072; latents [1, 16, 5, 32, 32] (1280 video tokens), 512 text tokens x 4096, guidance
5.0. Random weights (torch.manual_seed(0), float32) are saved once as a diffusers folder in --cache and reused;
both sides load them with their bf16/keep-f32 policy. Agreement: the same compiled step run with a schedule row
whose update is exactly `next = v` gives our guided velocity, compared with torch's (max abs diff, and relative
to max |v|). Our trace+lower and compile times are reported apart; then --repeats timed calls of each side,
interleaved, median. The last line is `ratio_fp32 <ours/torch s at float32> ratio_bf16 <ours/torch s at
bfloat16>` (the goal for float32 is <= 0.6). On a shared CPU absolute times say little; the ratios are the point.
--smoke: the tiny-random checkpoint's transformer (tpu_wan.models.tiny) at latents [1, 16, 2, 8, 8] and 16 text tokens,
one repeat (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from real_size import REAL_CONFIG  # noqa: E402  (the Wan 2.1 1.3B transformer config)

from tpu_wan.cli import with_cpu_xla_flags  # noqa: E402  (imports no jax)

MEDIUM_CONFIG = dict(REAL_CONFIG, num_layers=4, attention_head_dim=64, ffn_dim=3072)  # 12 heads x 64 = 768
LATENTS = (1, 16, 5, 32, 32)  # 5 x 16 x 16 patches of (1, 2, 2): 1280 video tokens
TEXT_TOKENS = 512
SMOKE_LATENTS = (1, 16, 2, 8, 8)  # 2 x 4 x 4 patches: 32 video tokens
SMOKE_TEXT_TOKENS = 16
GUIDANCE = 5.0
DTYPES = ("float32", "bfloat16")


def ensure_checkpoint(cache: Path) -> Path:
    """cache/transformer/{config.json, diffusion_pytorch_model.safetensors}: MEDIUM_CONFIG, seed 0, float32."""
    config = cache / "transformer" / "config.json"
    if config.is_file() and (cache / "transformer" / "diffusion_pytorch_model.safetensors").is_file():
        saved = json.loads(config.read_text())
        if all(saved.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in MEDIUM_CONFIG.items()):
            return cache
    import torch
    from diffusers import WanTransformer3DModel

    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}-"))
    try:
        torch.manual_seed(0)
        WanTransformer3DModel(**MEDIUM_CONFIG).eval().save_pretrained(staging / "transformer", safe_serialization=True)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(staging, cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def torch_step(model, latents, timestep, embeds, dtype):
    """WanPipeline's CFG forward as one batch of 2 (cond rows, then uncond rows), combined in the model dtype."""
    import torch

    with torch.no_grad():
        x = latents.to(dtype)
        v = model(torch.cat([x, x]), timestep.expand(2), embeds, return_dict=False)[0]
        cond, uncond = v.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)


def run_dtype(path: Path, dtype: str, args, mesh, latents, embeds) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from tpu_wan.models import checkpoints
    from tpu_wan.models.transformer import Denoiser
    from tpu_wan.runtime import mesh as mesh_lib
    from tpu_wan.sampling import schedulers

    ours = Denoiser(path, mesh, dtype, args.attention)
    ref = checkpoints.load_transformer(path, dtype)

    # Inputs exactly as Denoiser.denoise places them, then the step it calls each iteration.
    schedule = schedulers.make_schedule("unipc", 50, 3.0)
    sharding = mesh_lib.batch_sharding(mesh, latents.shape[0], 5)
    x = jax.device_put(latents, sharding)
    state = jax.device_put(schedulers.init_state(x), sharding)
    emb = jax.device_put(jnp.asarray(embeds).astype(ours.dtype), mesh_lib.batch_sharding(mesh, 2, 3))
    step, _ = ours.step_program(latents.shape, emb.shape, cfg=True)  # the program denoise runs (megatron: 1 device)
    t, coeffs, guidance = jnp.float32(schedule.timesteps[0]), jnp.asarray(schedule.coeffs[0]), jnp.float32(GUIDANCE)
    start = time.perf_counter()
    lowered = step.lower(ours.weights, x, state, emb, t, coeffs, guidance, {})  # {}: no image inputs
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start

    def run_ours(row=coeffs):
        out, _ = compiled(ours.weights, x, state, emb, t, row, guidance, {})
        return out.block_until_ready()

    tdtype = getattr(torch, dtype)
    t_lat = torch.from_numpy(latents)
    t_emb = torch.from_numpy(embeds).to(tdtype)
    t_t = torch.tensor([float(schedule.timesteps[0])], dtype=torch.float32)
    run_torch = lambda: torch_step(ref, t_lat, t_t, t_emb, tdtype)  # noqa: E731

    # Agreement: a row with P_V = 1 and every other weight 0 makes the step return the guided v itself (f32).
    identity = np.zeros(schedulers.NUM_COEFFS, np.float32)
    identity[schedulers.P_V] = 1.0
    v_ours = np.asarray(run_ours(jnp.asarray(identity)))
    v_ref = run_torch().float().numpy()
    diff = float(np.abs(v_ours - v_ref).max())
    scale = float(np.abs(v_ref).max())

    ours_s, torch_s = [], []
    for i in range(args.repeats):  # interleaved, alternating who goes first, so load swings hit both sides
        for side in (("ours", "torch") if i % 2 == 0 else ("torch", "ours")):
            fn, times = (run_ours, ours_s) if side == "ours" else (run_torch, torch_s)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return dict(dtype=dtype, ours=statistics.median(ours_s), torch=statistics.median(torch_s),
                ours_all=ours_s, torch_all=torch_s, lower=lower_s, compile=compile_s, diff=diff, rel=diff / scale)


def main() -> None:
    parser = argparse.ArgumentParser(description="One denoising step of a medium Wan DiT: ours vs diffusers torch eager")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attention", default="auto", help="our attention choice (auto = xla on CPU)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="checkpoint folder (default: bench-dit-medium-v1 beside the tiny-random cache)")
    parser.add_argument("--smoke", action="store_true", help="the tiny-random transformer, small inputs, one repeat")
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    # The scripts' XLA settings, so the bench measures what users run (set before jax is imported).
    os.environ["XLA_FLAGS"] = with_cpu_xla_flags(os.environ.get("XLA_FLAGS", ""))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import jax
    import torch
    from diffusers.utils import logging as df_logging

    from tpu_wan.models.tiny import default_cache_dir, ensure_tiny_checkpoint
    from tpu_wan.runtime.mesh import make_mesh

    df_logging.set_verbosity_error()
    if args.smoke:
        path, latents_shape, text_tokens = ensure_tiny_checkpoint(), SMOKE_LATENTS, SMOKE_TEXT_TOKENS
    else:
        cache = args.cache or default_cache_dir().parent / "bench-dit-medium-v1"
        path, latents_shape, text_tokens = ensure_checkpoint(cache.expanduser()), LATENTS, TEXT_TOKENS
    config = json.loads((path / "transformer" / "config.json").read_text())
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    latents = rng.standard_normal(latents_shape).astype(np.float32)
    embeds = rng.standard_normal((2, text_tokens, config["text_dim"])).astype(np.float32)  # cond, uncond
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus), mesh 1x1, attention "
          f"{args.attention}, XLA_FLAGS={os.environ['XLA_FLAGS']!r}; torch {torch.__version__} threads "
          f"{torch.get_num_threads()}", flush=True)
    print(f"checkpoint {path}: {config['num_layers']} layers, dim "
          f"{config['num_attention_heads'] * config['attention_head_dim']}, ffn {config['ffn_dim']}; latents "
          f"{list(latents_shape)}, {text_tokens} text tokens, CFG batch 2, {args.repeats} interleaved repeats",
          flush=True)

    results = {}
    for dtype in DTYPES:
        results[dtype] = r = run_dtype(path, dtype, args, mesh, latents, embeds)
        print(f"{dtype}: ours {' '.join(f'{s:.2f}' for s in r['ours_all'])}  torch "
              f"{' '.join(f'{s:.2f}' for s in r['torch_all'])}", flush=True)

    print()
    print(f"{'dtype':9s} {'ours s':>7s} {'torch s':>7s} {'ours/torch':>10s} {'lower s':>7s} {'compile s':>9s} "
          f"{'max|dv|':>9s} {'/max|v|':>8s}")
    for dtype, r in results.items():
        print(f"{dtype:9s} {r['ours']:7.3f} {r['torch']:7.3f} {r['ours'] / r['torch']:10.3f} {r['lower']:7.2f} "
              f"{r['compile']:9.2f} {r['diff']:9.2e} {r['rel']:8.1e}")
    if args.write and not args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from doc_tables import provenance, write_block

        cpu = cpu_name()
        table = ["| CPU | dtype | ours s | torch s | ours / torch | our trace+lower s | our compile s |",
                 "|" + "---|" * 7]
        table += [f"| {cpu} | {dtype} | {r['ours']:.3f} | {r['torch']:.3f} | {r['ours'] / r['torch']:.3f} | "
                  f"{r['lower']:.2f} | {r['compile']:.2f} |" for dtype, r in results.items()]
        write_block("dit_step", "\n".join(table), provenance())
    f32, bf16 = results["float32"], results["bfloat16"]
    print(f"ratio_fp32 {f32['ours'] / f32['torch']:.3f} ratio_bf16 {bf16['ours'] / bf16['torch']:.3f}")


def cpu_name() -> str:
    """The CPU model and whether it has native bf16 (AVX-512 BF16), which decides torch's bf16 speed."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU")
    return f"{model} ({os.cpu_count()} cpus{', AVX-512 BF16' if 'avx512_bf16' in info else ''})"


if __name__ == "__main__":
    main()
