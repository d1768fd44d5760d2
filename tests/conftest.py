"""Test setup: 8 virtual CPU devices (set before jax is imported), the tiny checkpoint, and tolerances."""

import os

# CPU unless the caller picks a platform: `JAX_PLATFORMS=tpu pytest -m tpu tests/test_splash_kernel.py` on a TPU
# host runs the compiled kernel tests (the rest of the suite expects the 8 virtual CPU devices).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# `make test` runs two workers on two cores: one compute thread each for torch and XLA's Eigen ops (and the scripts
# they start), instead of pools sized to every core that preempt the other worker's (tests/test_vae.py,
# test_parity.py and test_bf16_parity.py on 2 workers: 102 s -> 86 s, 18% less CPU time).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"
from tpu_wan.cli import with_cpu_xla_flags  # noqa: E402  (imports no jax)

os.environ["XLA_FLAGS"] = with_cpu_xla_flags(os.environ["XLA_FLAGS"])

# The scripts the tests start share a persistent compilation cache per test worker (not the user's): later runs
# of the same shapes skip XLA's compile, and no test depends on the user's cache.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tpu-wan-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
import jax  # noqa: E402

# In the test process itself every program compiles afresh (tests time and count compilations).
jax.config.update("jax_enable_compilation_cache", False)

# Tolerances, float32 throughout. Our path runs the same model code as diffusers but through XLA, which fuses
# and reorders reductions (and GSPMD splits matmuls over tp), so each op may differ by a few ulp (~1e-7).
# Embeddings: one encoder pass, errors stay at that level (measured <= 3.2e-7).
EMBED_RTOL = 1e-6
# Latents: those per-op differences pass through every transformer call and solver step and grow slowly
# (measured <= 5.9e-7 over the solvers, shifts, batches and meshes of test_parity.py).
LATENT_RTOL = 2e-6
# Frames: one VAE decode, compared in absolute terms on a [0, 1] scale (measured <= 1.13e-6).
FRAMES_ATOL = 5e-6
# Step caches (--cache) against diffusers' hooks: the skipped steps are the same, so the latents differ by the per-op
# roundings above plus the cached residuals added back (the same float32 adds as the hooks'): measured <= 5.9e-7 over
# First Block Cache and MagCache on 1x1 and 2x4 (tests/test_step_cache.py). A step skipped on one side only is
# >= 1e-4.
CACHE_LATENT_RTOL = 2e-6
# MagCache's calibrated ratios (mean |r_t| / |r_t-1| over the tokens of the block stack's residual) against diffusers':
# the norms are float32 sums in another order; measured <= 1.2e-7.
MAG_RATIO_RTOL = 1e-6

# bfloat16 (the TPU default for stages 1 and 2) cannot equal the float32 reference; both sides round differently
# (XLA keeps float32 inside fused ops where torch rounds each op's output to bf16), so our error may land on
# either side of diffusers' own bf16 error. The measure: ours vs the float32 reference <= this factor x diffusers'
# bf16 pipeline vs the same reference. Measured 0.77-1.09 (tests/test_bf16_parity.py prints each); a defect such
# as a value rounded to bf16 where diffusers keeps float32 (timestep embedding, norms) shows as a multiple.
BF16_OVER_DIFFUSERS = 1.5

# One small torch module through torchax vs torch eager, float32: the same ops, fused and reordered by XLA, so
# a few ulp (measured <= 1.5e-7); a wrong op is far above.
MODULE_RTOL = 1e-6

# The VAE decoder alone vs diffusers' AutoencoderKLWan.decode, absolute on the [0, 1] frame scale.
# float32: the same convolutions in another library reorder their sums (~1e-7 relative per op); across the ~40
# conv layers and the causal caches measured <= 1.1e-6 (tiny) and 1.85e-6 (real config); a wrong cache frame
# or weight layout gives >= 1e-2. The tiny Wan 2.2 VAE (residual up blocks, 2x2 patches): 8.6e-7 (2 latent frames)
# and 1.43e-6 (6).
VAE_F32_ATOL = 1e-5
# bfloat16 weights and activations (8-bit mantissa, ~4e-3 relative per op), norms and softmax in float32:
# measured 6.3e-3 (1 latent frame) to 1.46e-2 (9) on both configs. The tiny Wan 2.2 VAE: 1.88e-2 (2) and 1.89e-2
# (6), where diffusers' own bfloat16 decode of the same latents is 1.61e-2 off (ours 0.94-1.17x theirs over three
# draws of latents).
VAE_BF16_ATOL = 2e-2
# Sharded vs unsharded decode: the same ops, but GSPMD splits the convolutions (halos) and reductions per
# shard; measured 7.7e-7 (Wan 2.2: 4.2e-7 at 2 latent frames, 6.6e-7 at 6).
VAE_SHARDED_ATOL = 1e-6

# The VAE encoder vs diffusers' AutoencoderKLWan._encode (the latent distribution's parameters), relative.
# float32, tiny VAEs (8-16 channels, 1-17 frames): measured 4.2e-7 to 6.7e-7 (Wan 2.1) and 4.8e-7 to 5.3e-7
# (Wan 2.2). The real Wan 2.1 widths sum 3456-term products: there diffusers' own float32 is 1.2e-6 (1 frame) and
# 2.2e-6 (17) from its float64 encode, ours 6.4e-7 and 1.1e-6, so the real config is held to float64 instead.
# A wrong cache frame, patch order or padding side gives >= 1e-2.
VAE_ENCODER_RTOL = 1e-6
VAE_ENCODER_F64_RTOL = 2e-6
# bfloat16 vs diffusers float32, real widths: ours 1.1e-2 (1 frame) and 1.9e-2 (17), diffusers' own bfloat16
# encode 0.9e-2 and 1.7e-2.
VAE_ENCODER_BF16_RTOL = 3e-2

# metrics.json's time accounting. Untimed gaps between the sections (mesh and config set-up, the loop around the
# runs) are milliseconds against seconds of work; a stage left out of the sections, or a section counted twice,
# is tens of percent.
TIME_ACCOUNTING_RTOL = 0.05
# A warm start still traces and lowers every program (only XLA's compile is cached); measured ~10x less compile
# time on the tiny model, so half is far from both outcomes.
WARM_COMPILE_MAX_FRACTION = 0.5

# bf16 parity's floor: a run that silently stayed in float32 would sit ~1e-6 from the float32 reference, ~1e-4
# of diffusers' bf16 error; bf16 runs land at 0.77-1.09 of it.
BF16_MIN_SHARE = 0.25
# float64 arithmetic that should be an identity (e.g. TFLOP/s x seconds / FLOPs): only a last-bit rounding.
IDENTITY_RTOL = 1e-9

# Scheduler alone vs diffusers.
# Relative error ||ours - diffusers|| / ||diffusers|| allowed after every step. Both sides evaluate the same
# float32 linear combinations, but the rounding differs: XLA fuses them into FMAs, our step multiplies by stored
# reciprocals where torch divides, and torch's float32 log (used for the log-SNR step sizes) is not correctly
# rounded, so a few coefficients differ by an ulp. UniPC's corrector amplifies those ulps (its weights come
# from a cancelling formula), and this fake model, whose x0 predictions jump randomly every step, is a worst
# case for that: the 50-step UniPC runs reach ~9.4e-7 (~2.6e-7 with a smooth model). A 1% error in any
# single weight shows up at >= 1e-4; a wrong order or history bookkeeping far above that.
SCHEDULER_RTOL = 1e-6
# Element-wise backstop: |ours - ref| <= SCHEDULER_ATOL + SCHEDULER_RTOL * |ref| with samples of magnitude ~1-4.
SCHEDULER_ATOL = 1e-5
# The distill solvers' steps (float32) against a float64 transcription of lightx2v's formulas, with a fixed fake
# velocity: each step is two or three float32 multiply-adds of coefficients rounded once from float64, so a few
# ulps of the samples (measured 3.9e-8 to 7.9e-8 over 1, 4 and 5 steps); a wrong sigma or a noise draw out of
# order is >= 1e-2. End to end on the tiny model against the transcription driving diffusers' transformer the
# latents are held to LATENT_RTOL (measured 1.3e-7 to 1.9e-7 on 1x1 and 2x4).
DISTILL_RTOL = 1e-6
# The guided step's flops over the no-CFG step's (tiny model, one video): the transformer runs on 2 rows instead of
# 1. XLA's cost analysis counts a loop's body once (XLA attention on CPU runs one (row, head) block per trip of a
# lax.map, the blocks run as one loop); tpu_wan.tpu.hlo adds the other trips' matmul flops, not their elementwise
# work. Measured 1.998 (CPU compiler; 1.953 from the cost analysis alone), 1.995 (TPU compiler, v6e-1,
# tests/test_compile_only.py); a step still running the uncond half would be 1.0.
NO_CFG_FLOPS_RATIO_ATOL = 0.1
# The guided step of one video against the unguided step of two (the same transformer rows): only the per-latent
# element work differs (the solver update on two videos, the CFG combine on one); measured 3.5e-4 (CPU compiler).
SAME_ROWS_FLOPS_RTOL = 1e-3
# A stack of 6 layers, run as a loop and unrolled: the TPU compiler's flops (loop trips included, tpu_wan.tpu.hlo)
# against its matmuls' alone. XLA also counts elementwise work, a loop body's once: measured 8.7e-4 over (loop) and
# 5.2e-3 (unrolled).
LOOP_FLOPS_RTOL = 1e-2

# Attention kernels vs float64 softmax attention.
# Tolerances: relative error ||ours - ref|| / ||ref|| against float64 softmax attention of the same inputs.
# float32: every step is float32 (logits, exp2, sums, P.V) in a different summation order than the reference,
# so errors stay at a few float32 ulps of the logits accumulated over the D- and S-long sums: measured
# <= 4.9e-7 at the default scale and 9.0e-7 with scale 0.37 (4x larger logits, so 4x larger ulps).
KERNEL_F32_RTOL = 2e-6
# bfloat16 is judged against upstream splash attention (jax's, same interpreter, same inputs, blocks rounded up
# to its multiples of 128), both as relative error against float64 softmax attention. Upstream rounds q * scale
# and the output to bf16 and runs P.V in float32; ours rounds q * scale * log2(e) (the base-2 fold, never exact,
# where upstream's is exact when scale is a power of two, D = 64), rounds P to bf16 for P.V (the MXU's native
# input: 512 matmul pushes per 1024 x 1024 step against upstream's 768) unless pv_f32, and with k_smooth rounds
# the centred keys. Independent roundings add in quadrature, so ours is held to BF16_OVER_SPLASH x the budget
# sqrt(upstream^2 + each extra rounding^2), each extra measured on its own in a float64 emulation of that one
# rounding (test_splash_kernel._budget). Measured ours / budget 0.85-1.007 over the 12 bf16 inputs (ours /
# upstream alone: 0.88-1.98). Roundings the design does not make are caught: the logits s or the accumulator
# rounded to bf16 fail all 12 inputs, q rounded twice in the fold (scale, then log2 e) the 7 where that is not
# exact.
BF16_OVER_SPLASH = 1.10
# The absolute ceiling beside it, so a bad upstream number cannot carry ours: output, fold, P and centred-key
# roundings of unit-normal data, each ~1.4-1.7e-3, in quadrature ~3.2e-3; measured <= 3.32e-3 (k_smooth, D = 64).
# Leaving the padded keys unmasked gives 0.14.
KERNEL_BF16_RTOL = 3.5e-3
# The closed form of the bytes a chip sends per denoising step (arithmetic.dit_step_traffic_bytes, what
# --sharding auto decides by without a compile) against the TPU compiler's count: it models every collective that
# grows with the tokens or the weights, and misses only the small fixed ones (timestep embedding, modulation
# vectors): measured within 0.2% on one 1.3B block (3,120 to 17,160 tokens) and on the full models
# (bench/README.md's sharding table).
CLOSED_FORM_RTOL = 0.10
# The padding test: zero keys left unmasked get logit 0 and soak up probability, far above any rounding.
UNMASKED_MIN_ERR = 1e-3

# The parity setting: small but every mechanism is exercised (3 latent frames hit the VAE's temporal
# upsampling and its causal cache, 6 steps hit UniPC's first, second-order and lower-order-final steps).
HEIGHT, WIDTH, FRAMES, STEPS = 32, 48, 9, 6
PROMPTS = ("A cat playing piano in a jazz club", "一只小狗在雪地里奔跑, slow motion")
NEGATIVE = "blurry, low quality"
SEED = 42


def rel_err(ours, ref) -> float:
    """Frobenius norm of the difference over that of the reference."""
    import numpy as np

    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="session")
def tiny_path():
    from tpu_wan.models.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


# The real Wan 2.1 VAE's widths and depths (diffusers' convert_wan_to_diffusers.py), with random weights.
REAL_VAE_CONFIG = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True],
)


@pytest.fixture(scope="session")
def real_vae(tmp_path_factory):
    """The real Wan 2.1 VAE config with random weights: (a folder with vae/ as diffusers saves it, the model)."""
    import torch
    from diffusers import AutoencoderKLWan

    root = tmp_path_factory.mktemp("real_vae")
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**REAL_VAE_CONFIG).eval()
    vae.save_pretrained(root / "vae")
    return root, vae


@pytest.fixture(scope="session")
def ti2v_vae(tmp_path_factory):
    """The tiny Wan 2.2 VAE with random weights: (a folder with vae/ as diffusers saves it, the model)."""
    import torch
    from diffusers import AutoencoderKLWan

    from tpu_wan.models.tiny import TI2V_VAE_CONFIG, _wan22_vae_statistics

    root = tmp_path_factory.mktemp("ti2v_vae")
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**{**TI2V_VAE_CONFIG, **_wan22_vae_statistics()}).eval()
    vae.save_pretrained(root / "vae")
    return root, vae


@pytest.fixture(scope="session")
def diffusers_pipe(tiny_path):
    import torch
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_scheduler(solver: str, flow_shift: float):
    """The diffusers scheduler each --sample_solver reproduces (tpu_wan.sampling.schedulers' docstring), built from
    scratch: "unipc" is what Wan's scheduler_config.json holds, with `flow_shift`."""
    import diffusers

    if solver == "unipc":
        return diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000,
            solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[],
            final_sigmas_type="zero",
        )
    if solver == "dpm++":
        return diffusers.DPMSolverMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000,
            algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, final_sigmas_type="zero",
        )
    assert solver == "euler", solver
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=flow_shift, num_train_timesteps=1000)


def diffusers_run(pipe, prompt, guidance, output_type, flow_shift=3.0, solver="unipc", seeds=(SEED,), **kwargs):
    """diffusers' WanPipeline at the parity setting with `solver` at `flow_shift` swapped into pipe.scheduler,
    each video's noise drawn from its own seed as our stage 2 draws it (a list of prompts: one seed per prompt)."""
    import torch

    pipe.scheduler = diffusers_scheduler(solver, flow_shift)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    negative = None if prompt is None else [NEGATIVE] * len(prompt) if isinstance(prompt, list) else NEGATIVE
    with torch.no_grad():
        out = pipe(
            prompt=prompt, negative_prompt=negative, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
            num_inference_steps=STEPS, guidance_scale=guidance, output_type=output_type,
            generator=generators[0] if len(generators) == 1 else generators, **kwargs,
        ).frames
    return out.float().numpy() if output_type == "latent" else out
