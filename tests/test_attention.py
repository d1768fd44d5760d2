"""The attention dispatch: choices, platforms, and shard_map'd kernels equal to unsharded attention."""

import jax
import numpy as np
import pytest
from conftest import HEIGHT, KERNEL_F32_RTOL, LATENT_RTOL, WIDTH, rel_err

from tpu_wan import attention, pipeline
from tpu_wan.attention import AttentionError, AttentionOptions
from tpu_wan.mesh import make_mesh


def _qkv(b, n, l, s, d, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for shape in ((b, n, l, d), (b, n, s, d), (b, n, s, d))]


def test_auto_resolves_per_platform_and_length():
    opts = AttentionOptions()
    assert attention._resolve(opts, "cpu", 75_600, np.float32) == "xla"
    assert attention._resolve(opts, "tpu", 75_600, np.float32) == "custom"
    assert attention._resolve(opts, "tpu", 512, np.float32) == "xla"  # cross-attention over text
    assert attention._resolve(opts, "gpu", 75_600, jax.numpy.bfloat16) == "cudnn"
    assert attention._resolve(opts, "gpu", 75_600, np.float32) == "xla"


@pytest.mark.parametrize("choice", ["custom", "splash"])
def test_pallas_tpu_kernels_refused_on_gpu(choice):
    with pytest.raises(AttentionError, match=f"--attention {choice} is a Pallas TPU kernel.*found gpu"):
        attention._resolve(AttentionOptions(choice=choice), "gpu", 1024, np.float32)


def test_unknown_choice_is_an_error():
    with pytest.raises(AttentionError, match="attention must be one of .* found 'flash'"):
        AttentionOptions(choice="flash")


# (batch, heads): heads split over tp; batch of 1 (query sequence over dp); heads that do not divide tp
# (query sequence over both axes).
@pytest.mark.parametrize(
    "choice, b, n",
    [("custom", 2, 4), ("custom", 1, 4), ("custom", 1, 3), ("custom", 2, 6), ("splash", 2, 4), ("splash", 1, 3)],
)
def test_sharded_kernel_equals_unsharded(choice, b, n):
    q, k, v = _qkv(b, n, 40, 40, 64, seed=b * 10 + n)
    opts = AttentionOptions(choice=choice, bq=16, bkv=32, bkv_compute=16)
    ref = attention.xla_attention(q, k, v)
    single = jax.jit(attention.make_attention(opts, make_mesh(1, 1, devices=jax.devices()[:1])))(q, k, v)
    sharded = jax.jit(attention.make_attention(opts, make_mesh(2, 4)))(q, k, v)
    assert rel_err(single, ref) <= KERNEL_F32_RTOL
    assert rel_err(sharded, single) <= KERNEL_F32_RTOL


def test_window_with_split_query_sequence_is_refused():
    q, k, v = _qkv(1, 3, 16, 16, 64)
    fn = attention.make_attention(AttentionOptions(choice="custom", window_size=4), make_mesh(2, 4))
    with pytest.raises(AttentionError, match="window_size with the query sequence split"):
        jax.jit(fn)(q, k, v)


@pytest.mark.parametrize("dp, tp", [(1, 1), (2, 4)])
def test_denoiser_with_custom_kernel_equals_xla(tiny_path, dp, tp):
    # The whole DiT (self-attention over video tokens, cross-attention over text) with CFG, two solver steps.
    from tpu_wan import schedulers
    from tpu_wan.transformer import Denoiser

    mesh = make_mesh(dp, tp, devices=jax.devices()[: dp * tp])
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((2, 1, 512, 32), dtype=np.float32)
    noise = pipeline.initial_noise(0, (1, 16, 3, HEIGHT // 8, WIDTH // 8))
    schedule = schedulers.make_schedule("unipc", 2, 3.0)
    results = {}
    for choice in ("xla", "custom"):
        denoiser = Denoiser(tiny_path, mesh, "float32", AttentionOptions(choice=choice))
        results[choice] = denoiser.denoise(noise, embeds[0], embeds[1], schedule, 5.0, progress=False)
    assert rel_err(results["custom"], results["xla"]) <= LATENT_RTOL
