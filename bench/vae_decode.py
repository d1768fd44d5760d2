"""Time our Flax Wan VAE decoder against diffusers' AutoencoderKLWan.decode (torch eager, float32).

    .venv/bin/python bench/vae_decode.py [--repeats 3] [--dtype float32] [--cache DIR] [--smoke] [--write]

Real Wan 2.1 VAE config with random weights (built once, cached under --cache). For each size: ours (jitted,
timed after a warm-up call, median of --repeats, latents in -> frames on the host) and diffusers in the same
process (torch.no_grad, float32, the WanPipeline de-normalisation and post-processing included, median of
--repeats), their ratio, max abs difference and our GFLOP/s (the traced convolutions and matmuls of our program,
latent frame 0's 3 dropped frames included: torch does less work, so no torch GFLOP/s here; bench/conv3d.py has it);
then our lower+compile time at 5 and 17 latent frames with fresh decoders (min of 2). The last line is
`ratio_9f_128 <ours/torch at 9 frames 128x128> compile_ratio_17_5 <17 / 5>`. On CPU absolute times say
little; the ratios are the point. --smoke: the tiny-random checkpoint's VAE (tpu_wan.models.tiny), the 9f_128 size only,
one repeat, one compile of each length (seconds).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REAL_VAE_CONFIG = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True],
)
# name -> latent frames, h, w (video: 4(F-1)+1 frames at 8h x 8w)
SIZES = {"5f_64": (2, 8, 8), "9f_64": (3, 8, 8), "9f_128": (3, 16, 16)}
COMPILE_HW = (16, 16)


def ensure_real_vae(cache: Path) -> Path:
    """A folder with vae/ holding the real config with random weights (seed 0), built on first use."""
    if (cache / "vae" / "diffusion_pytorch_model.safetensors").is_file():
        return cache
    import torch
    from diffusers import AutoencoderKLWan

    staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".staging-"))
    torch.manual_seed(0)
    AutoencoderKLWan(**REAL_VAE_CONFIG).eval().save_pretrained(staging / "vae")
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(staging, cache)
    return cache


def torch_decode(vae, latents: np.ndarray) -> np.ndarray:
    """WanPipeline's decode: latents / (1 / std) + mean, vae.decode, (x * 0.5 + 0.5) clamped, channels-last, on
    the VAE's device (CPU or GPU), frames back on the host."""
    import torch

    device = next(vae.parameters()).device
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(torch.from_numpy(latents).to(device) / inv_std + mean, return_dict=False)[0]
    return (video * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).cpu().numpy()


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def decode_flops(decoder) -> float:
    """FLOPs of the decoder's last decode: its convolutions' and matmuls' as traced, every loop trip counted (XLA's
    cost analysis counts a loop body once, and the decode is a loop over latent frames of loops over blocks)."""
    from tpu_wan.tpu import arithmetic

    return float(sum(arithmetic.traced_flops(jitted, *args) for jitted, args in decoder.programs.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tpu_wan" / "bench-real-vae-v1")
    parser.add_argument("--smoke", action="store_true", help="the tiny-random VAE, one size, one repeat")
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    args = parser.parse_args()
    sizes = {"9f_128": SIZES["9f_128"]} if args.smoke else SIZES
    repeats, compile_runs = (1, 1) if args.smoke else (args.repeats, 2)

    import jax
    import torch
    from diffusers import AutoencoderKLWan

    from tpu_wan.models.tiny import ensure_tiny_checkpoint
    from tpu_wan.models.vae import VaeDecoder
    from tpu_wan.runtime.mesh import make_mesh

    if args.smoke:
        path = ensure_tiny_checkpoint()
    else:
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        path = ensure_real_vae(args.cache)
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{len(jax.devices())}, mesh {dict(mesh.shape)}, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}, ours {args.dtype}", flush=True)
    ours = VaeDecoder(path, mesh, dtype=args.dtype)
    vae = AutoencoderKLWan.from_pretrained(path / "vae", torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    torch_decode(vae, rng.standard_normal((1, 16, 1, 8, 8)).astype(np.float32))  # process-level warm-up

    ratios = {}
    table = ["| latents -> frames | ours s | torch s | ours / torch | max abs diff | our GFLOP | our GFLOP/s |",
             "|" + "---|" * 7]
    for name, (f, h, w) in sizes.items():
        latents = rng.standard_normal((1, 16, f, h, w)).astype(np.float32)
        start = time.perf_counter()
        ours.decode(latents)  # compiles
        first_call = time.perf_counter() - start
        t_ours, frames = timed(lambda: ours.decode(latents), repeats)
        t_torch, ref = timed(lambda: torch_decode(vae, latents), repeats)
        ratios[name] = t_ours / t_torch
        err = float(np.abs(frames - ref).max())
        gflop = decode_flops(ours) / 1e9
        print(f"{name}: latents {list(latents.shape)} -> frames {list(frames.shape)}: ours {t_ours:.3f}s "
              f"(first call {first_call:.1f}s) torch {t_torch:.3f}s ratio {ratios[name]:.3f} max abs diff {err:.2e}; "
              f"{gflop:.1f} GFLOP (traced convs and matmuls): ours {gflop / t_ours:.1f} GFLOP/s", flush=True)
        table.append(f"| {list(latents.shape)} -> {frames.shape[1]} x {frames.shape[2]} x {frames.shape[3]} | "
                     f"{t_ours:.2f} | {t_torch:.2f} | {ratios[name]:.3f} | {err:.1e} | {gflop:.1f} | "
                     f"{gflop / t_ours:.1f} |")

    compile_s = {5: [], 17: []}
    for _ in range(compile_runs):  # alternating fresh decoders, min of two: one compile varies by ~30% on a busy CPU
        for f in (17, 5):
            compile_s[f].append(VaeDecoder(path, mesh, dtype=args.dtype).compile_seconds((1, 16, f, *COMPILE_HW)))
    compile_s = {f: min(s) for f, s in compile_s.items()}
    for f in (5, 17):
        print(f"lower+compile at {f} latent frames ({4 * (f - 1) + 1} frames, latents {COMPILE_HW}): "
              f"{compile_s[f]:.2f}s (min of {compile_runs})", flush=True)
    if args.write and not args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from doc_tables import provenance, write_block

        write_block("vae_decode", "\n".join(table), provenance())
    print(f"ratio_9f_128 {ratios['9f_128']:.3f} compile_ratio_17_5 {compile_s[17] / compile_s[5]:.3f}")


if __name__ == "__main__":
    main()
