"""The attention dispatch: choices, platforms, and shard_map'd kernels equal to unsharded attention."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import KERNEL_F32_RTOL, rel_err

from tpu_wan.runtime import attention
from tpu_wan.runtime.attention import AttentionError, AttentionOptions
from tpu_wan.runtime.mesh import make_mesh


def _qkv(b, n, l, s, d, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for shape in ((b, n, l, d), (b, n, s, d), (b, n, s, d))]


def test_auto_resolves_per_platform_and_length():
    opts = AttentionOptions()
    assert attention._resolve(opts, "cpu", 75_600, np.float32) == "xla"
    assert attention._resolve(opts, "tpu", 75_600, np.float32) == "custom"
    assert attention._resolve(opts, "tpu", 512, np.float32) == "custom"  # cross-attention over text too
    assert attention._resolve(opts, "gpu", 75_600, jax.numpy.bfloat16) == "cudnn"
    assert attention._resolve(opts, "gpu", 75_600, np.float32) == "xla"
    assert attention._resolve(opts, "gpu", 75_600, jax.numpy.bfloat16, head_dim=256) == "xla"


def test_the_attention_flag_help_says_what_auto_runs():
    from tpu_wan import cli

    parser = cli.make_parser("x")
    cli.add_stage2_args(parser)
    helps = {a.dest: " ".join(a.help.split()) for a in parser._actions if a.help}
    assert "our exp2 kernel on TPU for every call (self- and cross-attention)" in helps["attention"]
    assert "cuDNN on a GPU in bf16/fp16 with head dim <= 128, XLA otherwise (CPU)" in helps["attention"]
    assert "costs bf16 one more rounding of the keys" in helps["k_smooth"]  # measured: docs/KERNEL.md


@pytest.mark.parametrize("choice", ["custom", "splash"])
def test_pallas_tpu_kernels_refused_on_gpu(choice):
    with pytest.raises(AttentionError, match=f"--attention {choice} is a Pallas TPU kernel.*found gpu"):
        attention._resolve(AttentionOptions(choice=choice), "gpu", 1024, np.float32)


def test_unknown_choice_is_an_error():
    with pytest.raises(AttentionError, match="attention must be one of .* found 'flash'"):
        AttentionOptions(choice="flash")


@pytest.mark.parametrize("settings, expected", [
    (dict(choice="xla", k_smooth=True), "--k_smooth acts on our kernel only: expected --attention auto or custom, "
                                        "found --attention xla"),
    (dict(choice="splash", k_smooth=True), "found --attention splash"),
    (dict(choice="cudnn", k_smooth=True), "found --attention cudnn"),
    (dict(choice="xla", bq=128), "--bqsize set the Pallas kernels' blocks: expected --attention auto, custom, "
                                 "splash, found --attention xla"),
    (dict(choice="cudnn", bkv=256, bkv_compute=128), "--bkvsize, --bkvcomputesize set"),
])
def test_kernel_settings_are_refused_where_they_do_nothing(settings, expected):
    # They would change no number, only the settings a sweep folder is matched by.
    with pytest.raises(AttentionError, match=re.escape(expected)):
        AttentionOptions(**settings)


def test_for_choice_keeps_only_what_acts_on_the_choice():
    opts = AttentionOptions(choice="custom", k_smooth=True, window_size=4, bq=128, bkv=256, bkv_compute=128)
    assert opts.for_choice("xla") == AttentionOptions(choice="xla", window_size=4)
    assert opts.for_choice("splash") == AttentionOptions(choice="splash", window_size=4, bq=128, bkv=256,
                                                         bkv_compute=128)


def test_cudnn_is_a_choice_refused_where_it_cannot_run():
    assert attention._resolve(AttentionOptions(choice="cudnn"), "gpu", 1024, jnp.bfloat16) == "cudnn"
    with pytest.raises(AttentionError, match="--attention cudnn: cuDNN attention needs a GPU, found cpu"):
        attention._resolve(AttentionOptions(choice="cudnn"), "cpu", 1024, jnp.bfloat16)
    with pytest.raises(AttentionError, match="needs bfloat16 or float16 inputs, found float32"):
        attention._resolve(AttentionOptions(choice="cudnn"), "gpu", 1024, np.float32)


# (batch, heads): heads split over tp (with a window: it needs the query sequence whole); batch of 1 (query
# sequence over dp); heads that do not divide tp (query sequence over both axes, here with k_smooth).
@pytest.mark.parametrize(
    "choice, b, n, window, k_smooth",
    [("custom", 2, 4, 7, False), ("custom", 1, 4, None, False), ("custom", 1, 3, None, True),
     ("custom", 2, 6, None, False), ("splash", 2, 4, None, False), ("splash", 1, 3, None, False)],
)
def test_sharded_kernel_equals_unsharded(choice, b, n, window, k_smooth):
    q, k, v = _qkv(b, n, 40, 40, 64, seed=b * 10 + n)
    opts = AttentionOptions(choice=choice, bq=16, bkv=32, bkv_compute=16, window_size=window, k_smooth=k_smooth)
    ref = attention.xla_attention(q, k, v, window_size=window)
    single = jax.jit(attention.make_attention(opts, make_mesh(1, 1, devices=jax.devices()[:1])))(q, k, v)
    sharded = jax.jit(attention.make_attention(opts, make_mesh(2, 4)))(q, k, v)
    assert rel_err(single, ref) <= KERNEL_F32_RTOL
    assert rel_err(sharded, single) <= KERNEL_F32_RTOL


@pytest.mark.parametrize("choice", ["custom", "splash", "xla"])
def test_window_is_ignored_on_sharded_cross_attention(choice):
    # Query sequence split over dp (batch 1), heads over tp: each shard holds L / 2 = 16 queries, as many as
    # the S = 16 keys. Cross-attention is decided from the global L != S, so the window does not apply (as
    # documented: a window is for self-attention); deciding it per shard would mask by local offsets.
    q, k, v = _qkv(1, 4, 32, 16, 64, seed=7)
    opts = AttentionOptions(choice="custom", window_size=2, bq=16, bkv=16, bkv_compute=16).for_choice(choice)
    fn = attention.make_attention(opts, make_mesh(2, 4))
    assert rel_err(jax.jit(fn)(q, k, v), attention.xla_attention(q, k, v)) <= KERNEL_F32_RTOL


def test_xla_window_matches_the_kernel_reference():
    from tpu_wan.kernels.splash_exp2 import attention_reference

    q, k, v = _qkv(1, 2, 30, 30, 64, seed=3)
    ref = attention_reference(q[0], k[0], v[0], window_size=5)
    assert rel_err(attention.xla_attention(q, k, v, window_size=5)[0], ref) <= KERNEL_F32_RTOL
    assert rel_err(attention.xla_attention_per_head(q, k, v, window_size=5)[0], ref) <= KERNEL_F32_RTOL


def test_block_sizes_over_vmem_are_refused_with_the_flags():
    opts = AttentionOptions(choice="custom", bq=2048, bkv=4096, bkv_compute=512)
    x = jax.ShapeDtypeStruct((1, 1, 8192, 128), jnp.bfloat16)
    with pytest.raises(AttentionError, match=r"--bqsize 2048, --bkvsize 4096, --bkvcomputesize 512 .* need "
                                             r"\d+ bytes .* VMEM limit of 16777216 bytes"):
        jax.eval_shape(attention.make_attention(opts), x, x, x)


def test_window_with_split_query_sequence_is_refused():
    q, k, v = _qkv(1, 3, 16, 16, 64)
    fn = attention.make_attention(AttentionOptions(choice="custom", window_size=4), make_mesh(2, 4))
    with pytest.raises(AttentionError, match="window_size with the query sequence split"):
        jax.jit(fn)(q, k, v)


# One denoising step at real size: the 1.3B model at 480p x 81 frames (32,760 video tokens) and the 14B model
# at 720p (75,600), traced (not run) on abstract weights; and the tiny model.
@pytest.mark.parametrize("model, height, width, frames", [
    ("tiny-random", 32, 48, 9),
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 480, 832, 81),
    ("Wan-AI/Wan2.1-T2V-14B-Diffusers", 720, 1280, 81),
], ids=["tiny", "1.3B-480p", "14B-720p"])
def test_every_attention_of_a_step_reaches_our_dispatch(monkeypatch, model, height, width, frames):
    # The transformer must never fall back to torchax's own scaled_dot_product_attention, which builds the
    # whole [L, S] logits (at 14B 720p: 40 heads x 75,600^2 x 4 bytes ~ 229 GB per CFG row).
    from tpu_wan.core import config as config_lib
    from tpu_wan.models import checkpoints
    from tpu_wan.models.transformer import Denoiser
    from tpu_wan.runtime import torchax_env

    torchax_env._torchax()  # torchax imported through our shim first
    from torchax.ops import jtorch

    def refuse(*args, **kwargs):
        raise AssertionError("attention went to torchax's reference lowering")

    calls = []
    make = attention.make_attention

    def counting(*args, **kwargs):
        fn = make(*args, **kwargs)

        def counted(q, k, v, *, scale=None):
            calls.append((q.shape, k.shape))
            return fn(q, k, v, scale=scale)

        return counted

    monkeypatch.setattr(jtorch, "_sdpa_reference", refuse)
    monkeypatch.setattr(attention, "make_attention", counting)
    mesh = make_mesh(2, 4)
    denoiser = Denoiser(checkpoints.resolve_configs(model), mesh, "bfloat16", abstract=True)
    dit = denoiser.config
    shape = config_lib.latent_shape(1, height, width, frames, dit.in_channels)
    step, args = denoiser.step_program(shape, (2, 512, dit.text_dim), cfg=True)
    jaxpr = jax.make_jaxpr(step)(*args)

    tokens = config_lib.video_tokens(shape, dit.patch_size)
    heads, head_dim = dit.num_attention_heads, dit.attention_head_dim
    self_attn, cross_attn = (2, heads, tokens, head_dim), (2, heads, 512, head_dim)
    print(f"{model}: {len(calls)} attention calls in a loop over {dit.num_layers} blocks, L={tokens}")
    # The blocks run as one loop over layers (transformer.LAYERS): its body, one block, is traced once.
    assert calls == [((2, heads, tokens, head_dim), self_attn), ((2, heads, tokens, head_dim), cross_attn)]
    assert _scan_lengths(jaxpr.jaxpr) == [dit.num_layers]


def _scan_lengths(jaxpr) -> list[int]:
    """The lengths of the scans in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn.params["length"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _scan_lengths(inner)
    return found


def test_splash_baseline_at_block_multiples_needs_no_segment_ids():
    # Lengths that are block multiples call upstream splash without segment ids (no per-logit compare).
    q, k, v = _qkv(1, 2, 256, 256, 64, seed=11)
    fn = attention.make_attention(AttentionOptions(choice="splash", bq=128, bkv=128, bkv_compute=128), platform="cpu")
    assert "segment" not in str(jax.make_jaxpr(fn)(q, k, v)).lower()
    assert rel_err(jax.jit(fn)(q, k, v), attention.xla_attention(q, k, v)) <= KERNEL_F32_RTOL
