"""python bench/few_steps.py [--smoke] [--repeats 3] [--cpu_steps 50] [--out DIR] [--from_dir DIR] [--write]

What a video costs with 50 UniPC steps and CFG (Wan's default), with 4 step-distilled steps and no CFG (lightx2v's
4-step models: `--sample_solver distill`, guidance 1), and with the step caches on the 50 guided steps (`--cache
first_block:0.05`, `--cache mag:<ratios>`).

1. DiT FLOPs per video, from the TPU compiler (libtpu, deviceless; nothing runs): the denoising step of Wan 2.1 14B
   at 832x480x81 compiled for v6e-8 (what `generate_flax.py --compile_only --compile_stages transformer --sharding
   sequence` compiles, called in this process) with CFG and without. Per video = the step program's flops (per
   chip) x chips x steps / videos per batch (CFG: one video's cond/uncond pair fills dp; without: dp videos).
2. The caches' share of block stacks, recorded on the tiny model (tiny-random, 50 UniPC steps, guidance 5, its
   preset size): metrics' `block_stacks_run` per branch. A skipped stack still runs the embeddings, the first block
   (First Block Cache) and the head, so its FLOPs are estimated as the step's times (1 block of the model's 40 for
   First Block Cache, 0 for MagCache) by the closed form; the cache rows of the FLOP column are that arithmetic.
3. CPU wall time per video, ours / diffusers, same process, same LoRA (a rank-16 random LoRA in the original Wan
   keys over every Linear, fused at load on our side, `load_lora_weights` + `fuse_lora` on diffusers'), same
   settings, on bench/dit_step.py's medium DiT (4 layers, dim 768) at latents [1, 16, 5, 32, 32]: ours is stage 2's
   loop (Denoiser.denoise, warm); diffusers' is WanPipeline for UniPC (its hooks for the caches) and, since its
   pipeline takes no timestep list, the distilled sampler's loop around its transformer for distill. Interleaved
   repeats, median; the full-step rows run --cpu_steps UniPC steps (the caches' skips then follow that count).

--out keeps the compile-only metrics.json files, --from_dir renders part 1 from them without compiling. --smoke:
tiny-random on v5e-4, tiny sizes, one repeat (seconds). The last line is `flops_ratio <50 steps CFG / 4 distilled>
cpu_ratio_distill <ours/diffusers>`. Compiler estimates and CPU times, not TPU measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from doc_tables import markdown_table, measured_line, stamp, write_block  # noqa: E402

from tpu_wan.cli import with_cpu_xla_flags  # noqa: E402  (imports no jax)

MODEL, HEIGHT, WIDTH, FRAMES, TOPOLOGY = "Wan-AI/Wan2.1-T2V-14B-Diffusers", 480, 832, 81, "v6e-8"
SMOKE_COMPILE = ("tiny-random", 32, 32, 5, "v5e-4")
FULL = dict(label="50 UniPC steps, CFG 5", settings=dict(num_inference_steps=50, guidance_scale=5.0,
                                                        sample_solver="unipc"))
DISTILL = dict(label="4 distilled steps (1000 750 500 250, shift 5), no CFG", settings=dict(sample_solver="distill"))
LORA_RANK = 16
FBC_THRESHOLD = 0.05  # diffusers' FirstBlockCacheConfig default
MAG_THRESHOLD = 0.06  # diffusers' MagCacheConfig default
PROMPT_TOKENS = 512


def compile_step(name: str, settings: dict, folder: Path, smoke: bool) -> dict:
    """generate_flax.py's compile-only run of the transformer stage (in this process), its metrics.json kept."""
    from tpu_wan.core.config import DEFAULT_NEGATIVE_PROMPT, DEFAULT_SEED, GenerationConfig, Stage2Settings
    from tpu_wan.run import aot

    model, height, width, frames, topology = SMOKE_COMPILE if smoke else (MODEL, HEIGHT, WIDTH, FRAMES, TOPOLOGY)
    base = GenerationConfig(model_id=model, prompts=("a cat playing piano",), negative_prompt=DEFAULT_NEGATIVE_PROMPT)
    asked = Stage2Settings(height=height, width=width, frames=frames, seeds=(DEFAULT_SEED,), sharding="sequence",
                           **settings)
    start = time.perf_counter()
    document = aot.compile_only(base, asked, topology, one_process=True, compile_stages=("transformer",))
    document = {**document, "wall_s": time.perf_counter() - start, "measured_at": stamp()}
    (folder / f"{name}.json").write_text(json.dumps(document, indent=1, default=str))
    return document


def flops_per_video(document: dict) -> tuple[float, int, int]:
    """(DiT flops per video, steps, transformer rows per video per step) of a compile-only document."""
    (step,) = document["stages"]["transformer"]["compiled"]
    chips = document["mesh"]["dp"] * document["mesh"]["tp"]
    cfg = document["config"]
    guided = cfg["guidance_scale"] > 1
    return step["flops"] * chips * cfg["num_inference_steps"] / cfg["batch_size"], cfg["num_inference_steps"], \
        2 if guided else 1


# ---------------------------------------------------------------------------------------------------------------
# CPU wall time, ours vs diffusers


def write_lora(path: Path, config: dict, seed: int = 0) -> Path:
    """A random rank-16 LoRA over every Linear of every block, original Wan keys (lora_down/up, alpha)."""
    import safetensors.torch
    import torch

    dim, ffn = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"]
    shapes = {**{f"{a}.{o}": (dim, dim) for a in ("self_attn", "cross_attn") for o in "qkvo"},
              "ffn.0": (ffn, dim), "ffn.2": (dim, ffn)}
    gen, tensors = torch.Generator().manual_seed(seed), {}
    for i in range(config["num_layers"]):
        for name, (out_dim, in_dim) in shapes.items():
            key = f"diffusion_model.blocks.{i}.{name}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(LORA_RANK, in_dim, generator=gen) * 0.02
            tensors[f"{key}.lora_up.weight"] = torch.randn(out_dim, LORA_RANK, generator=gen) * 0.02
            tensors[f"{key}.alpha"] = torch.tensor(float(LORA_RANK))
    safetensors.torch.save_file(tensors, path)
    return path


def diffusers_distill(transformer, latents, embeds, schedule, seed):
    """The distilled sampler around diffusers' transformer (its pipeline takes no timestep list): x0 = x - sigma v,
    re-noised to the next sigma from the seed's generator after its initial draw (tpu_wan.sampling.schedulers)."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator("cpu").manual_seed(seed)
    randn_tensor(latents.shape, generator=generator, dtype=torch.float32)  # the initial draw: `latents`
    x, sigmas = torch.from_numpy(latents), schedule.sigmas
    with torch.no_grad():
        for i in range(schedule.num_inference_steps):
            v = transformer(x, torch.tensor([float(schedule.timesteps[i])]), embeds, return_dict=False)[0]
            x0 = x - float(sigmas[i]) * v
            if i + 1 < schedule.num_inference_steps:
                n = randn_tensor(latents.shape, generator=generator, dtype=torch.float32)
                x = (1 - float(sigmas[i + 1])) * x0 + float(sigmas[i + 1]) * n
            else:
                x = x0
    return x.numpy()


def diffusers_unipc(flow_shift: float):
    """The diffusers scheduler our "unipc" solver reproduces (tpu_wan.sampling.schedulers' docstring)."""
    import diffusers

    return diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[],
        final_sigmas_type="zero")


def cpu_wall(args, smoke: bool) -> dict:
    """name -> {ours, diffusers, ...} seconds per video, medians of interleaved repeats."""
    import jax
    import torch
    from dit_step import LATENTS, SMOKE_LATENTS, ensure_checkpoint

    from tpu_wan.core.config import AttentionOptions, LoraFile
    from tpu_wan.models import checkpoints, kinds, lora
    from tpu_wan.models.tiny import default_cache_dir, ensure_tiny_checkpoint
    from tpu_wan.models.transformer import Denoiser
    from tpu_wan.run.sweep import NoiseStream
    from tpu_wan.runtime.mesh import make_mesh
    from tpu_wan.sampling import schedulers

    cache = default_cache_dir().parent
    path = ensure_tiny_checkpoint() if smoke else ensure_checkpoint(cache / "bench-dit-medium-v1")
    shape = SMOKE_LATENTS if smoke else LATENTS
    config = json.loads((path / "transformer" / "config.json").read_text())
    lora_path = write_lora(Path(args.tmp) / "lora.safetensors", config)
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    files = lora.checked((LoraFile(str(lora_path)),))
    ours = Denoiser(path, mesh, "float32", AttentionOptions(), kind=kinds.ModelKind(), loras={"transformer": files})
    reference = checkpoints.load_transformer(path, "float32")
    from diffusers import WanPipeline
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    state = WanLoraLoaderMixin.lora_state_dict(str(lora_path))
    reference.load_lora_adapter(state, prefix="transformer")
    reference.fuse_lora()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=reference, vae=None, scheduler=None)
    pipe.set_progress_bar_config(disable=True)

    rng = np.random.default_rng(0)
    text = PROMPT_TOKENS if not smoke else 16
    embeds = rng.standard_normal((1, text, config["text_dim"])).astype(np.float32)
    negative = rng.standard_normal((1, text, config["text_dim"])).astype(np.float32)
    seed = 0
    latents = NoiseStream([seed], shape[1:]).next()
    steps = 2 if smoke else args.cpu_steps
    unipc = schedulers.make_schedule("unipc", steps, 3.0)
    distill = schedulers.make_schedule("distill", 4, 5.0, denoising_steps=(1000, 750, 500, 250))

    def ours_full():
        return ours.denoise(latents, embeds, negative, unipc, 5.0, progress=False)

    def ours_distill():
        stream = NoiseStream([seed], shape[1:])
        stream.next()
        return ours.denoise(latents, embeds, None, distill, 1.0, progress=False, noise=lambda i: stream.next())

    def theirs_full():
        pipe.scheduler = diffusers_unipc(3.0)
        with torch.no_grad():
            return pipe(prompt_embeds=torch.from_numpy(embeds), negative_prompt_embeds=torch.from_numpy(negative),
                        latents=torch.from_numpy(latents), num_inference_steps=steps, guidance_scale=5.0,
                        output_type="latent").frames.numpy()

    def theirs_distill():
        return diffusers_distill(reference, latents, torch.from_numpy(embeds), distill, seed)

    def ours_cached(text):
        def run():
            ours.cache_log.clear()
            return ours.denoise(latents, embeds, negative, unipc, 5.0, progress=False, cache=text)
        return run

    def theirs_cached(config):
        def run():
            reference.enable_cache(config)
            try:
                return theirs_full()
            finally:
                reference.disable_cache()
        return run

    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

    ours_cached("mag:calibrate")()  # this model's ratios, measured by our calibration mode (the cond branch's)
    ratios = ours.cache_log[-1]["mag_ratios"]["cond"]
    mag = f"mag:{MAG_THRESHOLD}:{','.join(repr(r) for r in ratios)}"
    runs = {
        "full": (ours_full, theirs_full),
        "distill": (ours_distill, theirs_distill),
        "first_block": (ours_cached(f"first_block:{FBC_THRESHOLD}"),
                        theirs_cached(FirstBlockCacheConfig(threshold=FBC_THRESHOLD))),
        "mag": (ours_cached(mag), theirs_cached(MagCacheConfig(threshold=MAG_THRESHOLD, mag_ratios=ratios,
                                                               num_inference_steps=steps))),
    }
    results = {}
    for name, (ours_fn, theirs_fn) in runs.items():
        ours.cache_log.clear()
        a, b = ours_fn(), theirs_fn()  # warm (compiles ours) and agreement
        ran = ours.cache_log[-1]["ran"] if ours.cache_log else None
        times = {"ours": [], "diffusers": []}
        for i in range(args.repeats):
            for side in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):
                start = time.perf_counter()
                (ours_fn if side == "ours" else theirs_fn)()
                times[side].append(time.perf_counter() - start)
        rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        results[name] = {side: statistics.median(t) for side, t in times.items()} | {"rel": rel, "all": times,
                                                                                     "ran": ran}
        print(f"{name}: ours {results[name]['ours']:.2f} s, diffusers {results[name]['diffusers']:.2f} s per video, "
              f"latents rel {rel:.1e}" + (f", block stacks run {ran}" if ran else ""), flush=True)
    return results


def tiny_skips(smoke: bool) -> dict:
    """kind -> block stacks run per branch of the tiny model's 50 guided UniPC steps at the default thresholds."""
    import jax

    from tpu_wan.core.config import AttentionOptions
    from tpu_wan.models.tiny import ensure_tiny_checkpoint
    from tpu_wan.models.transformer import Denoiser
    from tpu_wan.run.sweep import NoiseStream
    from tpu_wan.runtime.mesh import make_mesh
    from tpu_wan.sampling import schedulers

    steps = 6 if smoke else 50
    denoiser = Denoiser(ensure_tiny_checkpoint(), make_mesh(1, 1, devices=jax.devices()[:1]), "float32",
                        AttentionOptions())
    rng = np.random.default_rng(0)  # prompt embeddings: random rows of the tiny model's text width
    embeds, negative = (rng.standard_normal((1, 512, denoiser.config.text_dim)).astype(np.float32) for _ in "ab")
    latents = NoiseStream([0], (16, 3, 8, 12)).next()  # the tiny preset's 96x64x9
    schedule = schedulers.make_schedule("unipc", steps, 3.0)

    def run(cache):
        denoiser.cache_log.clear()
        denoiser.denoise(latents, embeds, negative, schedule, 5.0, progress=False, cache=cache)
        return denoiser.cache_log[-1]

    ratios = run("mag:calibrate")["mag_ratios"]["cond"]
    out = {"first_block": run(f"first_block:{FBC_THRESHOLD}")["ran"],
           "mag": run(f"mag:{MAG_THRESHOLD}:{','.join(repr(r) for r in ratios)}")["ran"]}
    print(f"tiny model, {steps} guided steps: block stacks run {out}", flush=True)
    return out | {"steps": steps}


# ---------------------------------------------------------------------------------------------------------------


def table(full: dict, distill: dict, skips: dict, wall: dict, layers: int, cpu_steps: int) -> str:
    f_full, steps_full, rows_full = flops_per_video(full)
    f_distill, steps_distill, rows_distill = flops_per_video(distill)
    rows = [[FULL["label"], str(steps_full * rows_full), f"{f_full / 1e15:.1f}", "1", _wall(wall, "full")],
            [DISTILL["label"], str(steps_distill * rows_distill), f"{f_distill / 1e15:.2f}",
             f"{f_full / f_distill:.1f}x less", _wall(wall, "distill")]]
    steps = skips["steps"]
    for kind, label, kept in (("first_block", f"50 UniPC steps, CFG 5, First Block Cache {FBC_THRESHOLD}", 1),
                              ("mag", f"50 UniPC steps, CFG 5, MagCache {MAG_THRESHOLD}", 0)):
        ran = skips[kind]
        share = sum(ran.values()) / (steps * len(ran))  # of the branch calls, the share that ran the whole stack
        # a skipped call still runs the embeddings and head (and block 0 for First Block Cache): `kept` of the
        # model's blocks, the rest of the step's flops are the blocks'
        estimate = f_full * (share + (1 - share) * kept / layers)
        calls = " + ".join(f"{n} {b}" for b, n in ran.items())
        rows.append([label, f"{steps_full * rows_full} ({calls} of {steps} x {len(ran)} ran the blocks)",
                     f"~{estimate / 1e15:.1f}", f"{f_full / estimate:.1f}x less", _wall(wall, kind)])
    head = ["sampling (Wan 2.1 14B, 832x480x81)", "transformer calls per video (cache: block stacks, tiny model)",
            "DiT PFLOP per video (v6e-8, compiler)", "vs 50 steps + CFG",
            f"CPU s per video, medium DiT + LoRA ({cpu_steps} UniPC steps on the full-step rows): ours / diffusers"]
    return markdown_table(head, rows)


def _wall(wall: dict, name: str) -> str:
    r = wall.get(name)
    if r is None:
        return "-"
    ran = f" (block stacks run: {' + '.join(map(str, r['ran'].values()))})" if r.get("ran") else ""
    return f"{r['ours']:.2f} / {r['diffusers']:.2f} = {r['ours'] / r['diffusers']:.2f}{ran}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny-random on v5e-4, tiny sizes, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="keep the compile-only metrics.json files here")
    parser.add_argument("--from_dir", default=None, help="part 1 from the metrics.json files kept here")
    parser.add_argument("--skip_cpu", action="store_true", help="no CPU wall times (parts 1 and 2 only)")
    parser.add_argument("--cpu_steps", type=int, default=50, help="UniPC steps of the timed full-step CPU runs")
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    os.environ["XLA_FLAGS"] = with_cpu_xla_flags(os.environ.get("XLA_FLAGS", ""))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the timed runs are this host's; the TPU compiles are subprocesses
    from diffusers.utils import logging as df_logging

    df_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        documents = {}
        for name, run in (("full", FULL), ("distill", DISTILL)):
            kept = Path(args.from_dir or out) / f"{name}.json"
            documents[name] = json.loads(kept.read_text()) if args.from_dir else compile_step(
                name, run["settings"], out, args.smoke)
            flops, steps, rows = flops_per_video(documents[name])
            print(f"{run['label']}: {flops / 1e12:.1f} TFLOP per video ({steps} steps x {rows} rows; compile "
                  f"{documents[name]['wall_s']:.0f} s)", flush=True)
        skips = tiny_skips(args.smoke)
        wall = {} if args.skip_cpu else cpu_wall(args, args.smoke)
    layers = 1 if args.smoke else 40
    text = table(documents["full"], documents["distill"], skips, wall, layers, 2 if args.smoke else args.cpu_steps)
    print(text)
    if args.write and not args.smoke:
        # part 1 may come from an earlier run's documents (--from_dir): both runs are named
        write_block("few_steps", text, measured_line([*documents.values(), {"measured_at": stamp()}]))
    ratio = flops_per_video(documents["full"])[0] / flops_per_video(documents["distill"])[0]
    cpu = wall["distill"]["ours"] / wall["distill"]["diffusers"] if wall else float("nan")
    print(f"flops_ratio {ratio:.1f} cpu_ratio_distill {cpu:.2f}")


if __name__ == "__main__":
    main()
