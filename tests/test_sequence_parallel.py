"""Sequence-parallel sharding (tpu_wan.runtime.parallelism): the tiny pipeline against diffusers on every mesh shape,
the token regrouping against plain attention, and how `--sharding auto` decides."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FRAMES, HEIGHT, LATENT_RTOL, NEGATIVE, PROMPTS, SEED, STEPS, WIDTH, diffusers_run, rel_err

from tpu_wan.core.config import AttentionOptions, GenerationConfig, latent_shape, video_tokens
from tpu_wan.models import checkpoints
from tpu_wan.run import pipeline
from tpu_wan.runtime import attention, parallelism
from tpu_wan.runtime.mesh import make_mesh
from tpu_wan.tpu import arithmetic, hlo

MESHES = [(1, 1), (2, 4), (1, 8), (8, 1)]
# float32 attention over [B N L D] against the same math in one piece: only the order of the float32 sums differs.
REGROUP_ATOL = 1e-6


def _config(mesh, **sampling):
    cfg = GenerationConfig(model_id="tiny-random", prompts=(PROMPTS[0],), negative_prompt=NEGATIVE)
    args = pipeline.Stage2Settings(**{"height": HEIGHT, "width": WIDTH, "frames": FRAMES, "num_inference_steps": STEPS,
                                    "guidance_scale": 5.0, "seeds": (SEED,), "dtype": "float32", **sampling})
    return pipeline.resolve_stage2(cfg, args, mesh)


@pytest.fixture(scope="module")
def embeddings(tiny_path):
    """Our embeddings on one device (test_parity holds them to diffusers')."""
    encoder = pipeline.load_encoder(tiny_path, make_mesh(1, 1, jax.devices()[:1]), "float32")
    return pipeline.encode(encoder, _config(make_mesh(1, 1, jax.devices()[:1])))


def _tokens(tiny_path) -> int:
    dit = checkpoints.read_config(tiny_path, "transformer")
    shape = latent_shape(1, HEIGHT, WIDTH, FRAMES, dit["in_channels"])
    return video_tokens(shape, dit["patch_size"])


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: f"mesh{m[0]}x{m[1]}")
def test_sequence_sharding_equals_diffusers(mesh_shape, tiny_path, embeddings, diffusers_pipe):
    dp, tp = mesh_shape
    mesh = make_mesh(dp, tp, devices=jax.devices()[: dp * tp])
    assert _tokens(tiny_path) == 18  # divides none of the meshes' 4 or 8 token shards: the padding path runs
    cfg = _config(mesh, sharding="sequence", attention=AttentionOptions("custom"))
    assert cfg.stage2.sharding == "sequence"
    denoiser = pipeline.load_denoiser(tiny_path, mesh, "float32", "custom")
    latents = pipeline.denoise(denoiser, cfg, *embeddings, progress=False)
    ref = diffusers_run(diffusers_pipe, PROMPTS[0], 5.0, "latent")
    err = rel_err(latents, ref)
    print(f"mesh {dp}x{tp} sequence sharding, custom kernel: latents rel err {err:.2e}")
    assert err <= LATENT_RTOL
    if mesh.size > 1:
        ((jitted, args),) = denoiser.programs.values()
        collectives = hlo.summarize(jitted.lower(*args).compile().as_text())["collectives"]
        count = {kind: c["count"] for kind, c in collectives.items()}
        # The tiny DiT has 2 blocks, each with one self-attention call (cond and uncond rows in one batch):
        # 2x4: the 4 heads divide the 4 token shards, so q, k, v and the output are regrouped by all-to-all (4 per
        #      block); 1x8: 4 heads do not divide 8 token shards, so k and v are gathered whole (2 per block).
        # 8x1: the CFG pair is padded to dp = 8 rows (batch.default_batch_size), so the rows fill dp and no token
        #      is split: the step moves nothing activation-sized (one all-to-all of the latents, as Megatron).
        expected = {(2, 4): ("all-to-all", 8), (1, 8): ("all-gather", 4), (8, 1): ("all-gather", 0)}[(dp, tp)]
        kind, least = expected
        print(f"mesh {dp}x{tp}: collectives {count}")
        assert count[kind] >= least if least else count[kind] == 0, count
        if (dp, tp) == (8, 1):
            assert count["all-to-all"] <= 1 and count["all-reduce"] <= 1, count


def test_the_two_modes_share_one_loaded_model(tiny_path, embeddings):
    mesh = make_mesh(2, 4)
    denoiser = pipeline.load_denoiser(tiny_path, mesh, "float32", "xla")
    runs = {mode: pipeline.denoise(denoiser, _config(mesh, sharding=mode, attention=AttentionOptions("xla")), *embeddings,
                                   progress=False) for mode in parallelism.MODES}
    assert rel_err(runs["sequence"], runs["megatron"]) <= LATENT_RTOL
    assert denoiser.forward("sequence") is denoiser.forward("sequence")  # traced once per mode, same weights


@pytest.mark.parametrize("mesh_shape,rows,heads", [((2, 4), 2, 4), ((1, 8), 2, 4), ((8, 1), 2, 4), ((2, 4), 1, 8)])
@pytest.mark.parametrize("self_attention", [True, False], ids=["self", "cross"])
def test_regrouped_attention_equals_plain_attention(mesh_shape, rows, heads, self_attention):
    dp, tp = mesh_shape
    layout = parallelism.Layout("sequence", make_mesh(dp, tp))
    rng = np.random.default_rng(0)
    tokens = 45  # divides no shard count above
    keys = tokens if self_attention else 24
    q = jnp.asarray(rng.standard_normal((rows, heads, tokens, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((rows, heads, keys, 16)), jnp.float32) for _ in range(2))
    fn = attention.make_attention("xla", layout.mesh, layout=layout)
    out = jax.jit(fn)(q, k, v)
    np.testing.assert_allclose(out, attention.xla_attention(q, k, v), atol=REGROUP_ATOL)


@pytest.mark.parametrize("choice", ["custom", "xla"])
def test_windowed_regrouped_attention_on_tokens_the_shards_do_not_divide(choice):
    # 45 tokens over 4 token shards (padded to 48): after the all-to-all each head's queries and keys are the 45
    # real tokens in order, so the window sees true positions (the kernel refuses L != S with a window).
    layout = parallelism.Layout("sequence", make_mesh(2, 4))
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 4, 45, 16)), jnp.float32) for _ in range(3))
    fn = attention.make_attention(AttentionOptions(choice, window_size=6), layout.mesh, layout=layout)
    out = jax.jit(fn)(q, k, v)
    np.testing.assert_allclose(out, attention.xla_attention(q, k, v, window_size=6), atol=REGROUP_ATOL)


def test_layout_axes():
    mesh = make_mesh(2, 4)
    sequence, megatron = parallelism.Layout("sequence", mesh), parallelism.Layout("megatron", mesh)
    assert sequence.token_axes(2) == ("tp",) and sequence.token_shards(2) == 4  # the CFG pair on dp
    assert sequence.token_axes(1) == ("dp", "tp") and sequence.token_shards(1) == 8  # one row: tokens on both
    assert megatron.token_axes(2) == () and megatron.token_shards(2) == 1
    assert parallelism.Layout("sequence", make_mesh(8, 1)).token_axes(2) == ("dp",)
    with pytest.raises(ValueError, match="sharding mode"):
        parallelism.Layout("ring", mesh)


def test_traffic_closed_forms_by_hand():
    # 14B at 720p x 81 frames on v6e-8 (dp 2 x tp 4), bf16, CFG: one row per chip, L = 21 x 45 x 80 = 75,600.
    dit = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40,
           "patch_size": [1, 2, 2], "in_channels": 16, "out_channels": 16}
    mesh = make_mesh(2, 4)
    hidden, text = 75600 * 5120 * 2, 512 * 5120 * 2  # one [1, L, E] bf16 hidden state, one [1, S, E] text
    out, latents = 75600 * 64 * 2, 16 * 21 * 90 * 160  # proj_out's [1, L, 16 x 2 x 2] bf16; one video's latents
    # once per step in both modes: the text embedder's all-reduce over tp, the guidance combine over dp (3 float32
    # latent-sized all-reduces, 2 permutes of the bf16 latents)
    step = 2 * 0.75 * text + 3 * 2 * 0.5 * latents * 4 + 2 * latents * 2
    megatron = (40 * (3 * 2 * 0.75 * hidden + 3 * 2 * 0.75 * 75600 * 4) + step
                + 0.75 * hidden + 2 * 0.75 * out)  # + the patch embedding's gather and proj_out's all-reduce
    ffn = 0.75 * 2 * 5120 * 13824 * 2  # at 75,600 tokens gathering the FFN weights is the cheaper way
    assert ffn < 0.75 * hidden + 2 * 0.75 * hidden
    sequence = (40 * (0.75 * 6 * 5120**2 * 2 + ffn + 4 * 0.75 * hidden / 4 + 2 * 0.75 * text) + step
                + 0.75 * hidden / 4 + 0.75 * out)  # + the patch embedding's all-to-all and proj_out's gather
    for mode, expected in (("megatron", megatron), ("sequence", sequence)):
        got = arithmetic.dit_step_traffic_bytes(dit, parallelism.Layout(mode, mesh), 2, 75600, 512, 2)
        assert got == pytest.approx(expected, rel=1e-12), mode
    assert parallelism.choose(dit, 2, 75600, 512, mesh, 2) == "sequence"
    assert parallelism.choose(dit, 2, 1560, 512, mesh, 2) == "megatron"  # one 480p frame: weights outweigh tokens
    assert parallelism.choose(dit, 2, 75600, 512, make_mesh(1, 1, jax.devices()[:1]), 2) == "megatron"  # a tie
    assert parallelism.choose({**dit, "num_attention_heads": 12}, 2, 1560, 512, make_mesh(1, 8), 2) == "sequence"


def test_auto_is_resolved_and_recorded(tiny_path):
    mesh = make_mesh(2, 4)
    short, long = _config(mesh), _config(mesh, height=128, width=192, frames=33)
    assert (short.stage2.sharding, long.stage2.sharding) == ("megatron", "sequence")  # the tiny model's crossover
    assert _config(make_mesh(1, 1, jax.devices()[:1])).stage2.sharding == "megatron"
    assert _config(mesh, sharding="sequence").to_json_dict()["sharding"] == "sequence"
    from tpu_wan.run import sweep

    assert sweep.signature_digest(short) != sweep.signature_digest(short.replace(sharding="sequence"))
