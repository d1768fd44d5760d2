"""The native Flax VAE decoder against diffusers' AutoencoderKLWan.decode (torch float32, the oracle)."""

import re

import jax
import numpy as np
import pytest
import torch
from conftest import VAE_BF16_ATOL, VAE_F32_ATOL, VAE_SHARDED_ATOL
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from tpu_wan.core.errors import UserError
from tpu_wan.models.vae import WEIGHTS_FILE, VaeDecoder, activation_sharding, decoder_keys, load_config, load_params
from tpu_wan.models.vae_modules import ResidualRun, WanVaeDecoder, torch_keys
from tpu_wan.runtime.mesh import make_mesh

FRAME_COUNTS = (1, 2, 3, 5, 9)  # 1: frame 0 alone; 2: the 'Rep' time_conv step; >= 3: caches carried on
TI2V_FRAME_COUNTS = (2, 6)  # the Wan 2.2 VAE's latent frames: 5 and 21 video frames
TI2V_HW = (2, 3)  # its latent h, w: 32 x 48 pixels at 16x
TINY_HW = (4, 8)  # latent h, w: W = 8 splits over all 8 devices of the 2x4 mesh at every resolution
REAL_HW = (1, 2)  # the real widths and depths at the smallest size where attention sees more than one position

@pytest.fixture(scope="session")
def real_path(real_vae):
    return real_vae[0]


def _mesh(dp=1, tp=1):
    return make_mesh(dp, tp, devices=jax.devices()[: dp * tp])


def _latents(frames, hw, batch=1, seed=0, channels=16):
    return np.random.default_rng(seed).standard_normal((batch, channels, frames, *hw)).astype(np.float32)


def diffusers_frames(vae, latents: np.ndarray) -> np.ndarray:
    """WanPipeline's decode of normalised latents [N C F h w] -> frames [N T H W 3] in [0, 1]."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(torch.from_numpy(latents) / inv_std + mean, return_dict=False)[0]  # [N 3 T H W]
    return (video * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()


def _torch_vae(path):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(path / "vae", torch_dtype=torch.float32).eval()


def _abstract_params(config):
    return nnx.split(nnx.eval_shape(lambda: WanVaeDecoder(config)))[1]


def _max_err(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours.astype(np.float64) - ref).max())


@pytest.fixture(scope="module")
def tiny_oracle(tiny_path):
    """diffusers' frames for the tiny VAE at every frame count."""
    vae, latents = _torch_vae(tiny_path), _latents(max(FRAME_COUNTS), TINY_HW)
    return latents, {f: diffusers_frames(vae, latents[:, :, :f]) for f in FRAME_COUNTS}


@pytest.fixture(scope="module")
def real_oracle(real_vae):
    """diffusers' frames for the real config, from one decode of the most frames: diffusers decodes latent
    frame by frame, each seeing only earlier frames' caches, so F latent frames give exactly the first
    4(F-1)+1 frames of that (test_tiny_vae_matches_diffusers checks this bit for bit)."""
    latents = _latents(max(FRAME_COUNTS), REAL_HW)
    return latents, diffusers_frames(real_vae[1], latents)


@pytest.fixture(scope="module")
def tiny_decoder(tiny_path):
    return VaeDecoder(tiny_path, _mesh())


def test_tiny_vae_matches_diffusers(tiny_decoder, tiny_oracle):
    latents, ref = tiny_oracle
    errs, ours = {}, {}
    for f in FRAME_COUNTS:
        ours[f] = tiny_decoder.decode(latents[:, :, :f])
        assert ours[f].shape == (1, 4 * (f - 1) + 1, 8 * TINY_HW[0], 8 * TINY_HW[1], 3)
        errs[f] = _max_err(ours[f], ref[f])
    for f in FRAME_COUNTS:
        # Both decoders are causal: fewer latent frames decode to a prefix, bit for bit (real_oracle and the
        # bfloat16 test rely on it).
        np.testing.assert_array_equal(ref[f], ref[max(FRAME_COUNTS)][:, : ours[f].shape[1]])
        np.testing.assert_array_equal(ours[f], ours[max(FRAME_COUNTS)][:, : ours[f].shape[1]])
    print("tiny float32 max abs err per latent frame count:", errs)
    assert max(errs.values()) <= VAE_F32_ATOL, errs
    # The on-device uint8 conversion equals the host one the mp4 writer uses, bit for bit.
    from tpu_wan.core.video import to_uint8

    np.testing.assert_array_equal(tiny_decoder.decode(latents, uint8=True), to_uint8(tiny_decoder.decode(latents)))


def test_real_config_matches_diffusers(real_path, real_oracle):
    latents, ref = real_oracle
    decoder = VaeDecoder(real_path, _mesh())
    errs = {}
    for f in FRAME_COUNTS:
        ours = decoder.decode(latents[:, :, :f])
        errs[f] = _max_err(ours, ref[:, : 4 * (f - 1) + 1])
    print("real-config float32 max abs err per latent frame count:", errs)
    assert max(errs.values()) <= VAE_F32_ATOL, errs


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_bfloat16_close_to_diffusers_float32(which, tiny_path, real_path, tiny_oracle, real_oracle):
    # bfloat16 rounding accumulates with depth (real config) and over the causal caches carried frame to frame.
    # One decode of the most latent frames, checked prefix by prefix: F latent frames decode to exactly its
    # first 4(F-1)+1 frames (causal; bit for bit in float32, test_tiny_vae_matches_diffusers, and checked
    # here for bfloat16 at one count), so each prefix's error is the error of an F-frame decode.
    f_max = max(FRAME_COUNTS)
    latents, ref = (tiny_oracle[0], tiny_oracle[1][f_max]) if which == "tiny" else real_oracle
    decoder = VaeDecoder(tiny_path if which == "tiny" else real_path, _mesh(), dtype="bfloat16")
    ours = decoder.decode(latents[:, :, :f_max])
    if which == "tiny":
        np.testing.assert_array_equal(decoder.decode(latents[:, :, :2]), ours[:, :5])
    errs = {f: _max_err(ours[:, : 4 * (f - 1) + 1], ref[:, : 4 * (f - 1) + 1]) for f in FRAME_COUNTS}
    print(f"{which} bfloat16 max abs err per latent frame count:", errs)
    assert max(errs.values()) <= VAE_BF16_ATOL, errs


def test_sharded_decode_equals_unsharded(tiny_path, tiny_decoder):
    latents = _latents(3, TINY_HW, seed=1)
    sharded = VaeDecoder(tiny_path, _mesh(2, 4)).decode(latents)
    unsharded = tiny_decoder.decode(latents)
    print(f"2x4 vs 1x1 mesh max abs diff: {_max_err(sharded, unsharded):.3e}")
    np.testing.assert_allclose(sharded, unsharded, rtol=0, atol=VAE_SHARDED_ATOL)


def test_activation_sharding_rules():
    mesh = _mesh(2, 4)
    spec = lambda shape: activation_sharding(mesh, shape).spec  # noqa: E731  shape [N T H W C]
    assert spec((1, 4, 8, 16, 3)) == P(None, None, None, ("dp", "tp"), None)  # W over all 8 devices
    assert spec((2, 4, 8, 12, 3)) == P("dp", None, None, ("tp",), None)  # videos over dp, W over tp
    assert spec((1, 4, 16, 12, 3)) == P(None, None, ("dp", "tp"), None, None)  # W does not divide, H does
    assert spec((1, 4, 8, 12, 3)) == P(None, None, None, ("tp",), None)  # H would leave one row per device
    assert spec((1, 4, 3, 12, 3)) == P(None, None, None, ("tp",), None)
    assert spec((1, 4, 3, 5, 3)) == P(None)  # too small to split
    assert spec((1, 4, 2, 8, 3)) == P(None, None, None, ("tp",), None)  # two columns per device
    assert spec((1, 4, 2, 4, 3)) == P(None)  # one column per device: not split
    # one layout for a whole decode, decided by the latents: a layer at twice their size keeps it
    assert activation_sharding(mesh, (1, 4, 16, 24, 3), grid=(8, 12)).spec == spec((1, 4, 8, 12, 3))
    assert spec((1, 4, 16, 24, 3)) == P(None, None, None, ("dp", "tp"), None)


@pytest.mark.parametrize("mesh", [(2, 2), (4, 2)], ids=lambda m: f"mesh{m[0]}x{m[1]}")
def test_small_latents_on_small_meshes_decode_as_unsharded(tiny_path, tiny_decoder, mesh):
    # latents 2x3 once split H over tp, one row per device, which jax's default partitioner decoded wrong (8.9e-2 on
    # 2x2, 1.5e-1 on 4x2); 4x6 splits two columns per device
    for hw in [(2, 3), (4, 6)]:
        latents = _latents(2, hw, seed=2)
        err = _max_err(VaeDecoder(tiny_path, _mesh(*mesh)).decode(latents), tiny_decoder.decode(latents))
        print(f"latents {hw} on {mesh}: max abs diff {err:.3e}")
        assert err <= VAE_SHARDED_ATOL


def test_frame_count_changes_only_the_loop_trip_count(tiny_path):
    # All latent frames run as one scan whose body does not depend on F, and each run of same-width residual blocks
    # as a loop inside it: the compiled programs for 5 and 17 latent frames hold the same instructions (unrolled,
    # 17 frames would hold ~4x as many), so compile time and program size stay flat as videos get longer.
    decoder = VaeDecoder(tiny_path, _mesh())
    model = nnx.merge(decoder._graphdef, decoder.params)
    runs = [m.count for _, m in nnx.iter_graph(model) if isinstance(m, ResidualRun)]
    assert sorted(runs) == [1, 1, 2, 2]  # the tiny VAE's up blocks (num_res_blocks=1: runs of 2, or 1 after a widening)
    programs = {}
    for f in (5, 17):
        jitted, args = decoder.programs_for((1, 16, f, 2, 2), uint8=False)["decode"]
        text = jitted.lower(*args).compile().as_text()
        programs[f] = (sum(1 for line in text.splitlines() if re.match(r"\s+(ROOT )?%\S+ = ", line)),
                       text.count(" while("), text.count(" convolution("))
    print("compiled decode program (instructions, while loops, convolutions):", programs)
    # The frame loop and a loop per run of two blocks (XLA inlines a loop of one trip).
    assert programs[17] == programs[5] and programs[5][1] == 1 + runs.count(2)


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_every_weight_used_once_and_every_param_filled(which, tiny_path, real_path):
    path = tiny_path if which == "tiny" else real_path
    decoder = VaeDecoder(path, _mesh())
    params = list(nnx.to_flat_state(decoder.params))
    keys = [key for p, v in params for key in torch_keys(p, v.shape)]
    assert len(set(keys)) == len(keys), "two parameters read the same weight"
    assert sorted(keys) == decoder_keys(path / "vae" / WEIGHTS_FILE)  # and every decoder weight is read
    shapes = {p: v.shape for p, v in nnx.to_flat_state(_abstract_params(decoder.config))}
    assert len(shapes) == len(params)
    for p, v in params:
        assert isinstance(v[...], jax.Array) and v.shape == shapes[p], p


def test_missing_or_extra_weights_are_refused(tiny_path, tmp_path):
    tensors = load_file(tiny_path / "vae" / WEIGHTS_FILE)
    abstract = _abstract_params(load_config(tiny_path / "vae"))
    sharding = jax.sharding.NamedSharding(_mesh(), P())
    missing = dict(tensors)
    del missing["decoder.conv_in.weight"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing \['decoder.conv_in.weight'\]"):
        load_params(abstract, tmp_path / "missing.safetensors", np.float32, sharding)
    extra = dict(tensors, **{"decoder.extra.weight": np.zeros(3, np.float32)})
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"unused decoder keys \['decoder.extra.weight'\]"):
        load_params(abstract, tmp_path / "extra.safetensors", np.float32, sharding)



def test_the_config_is_what_diffusers_builds_the_vae_from(tiny_path, real_path, tmp_path):
    """load_config reads config.json without importing diffusers; it must equal the arguments AutoencoderKLWan's
    constructor gets from the same file: its own extract_init_dict (unknown keys dropped) over its signature's
    defaults, on the tiny and real configs, the packaged ones, and a file that leaves everything to the defaults."""
    import inspect
    import json
    import shutil

    from diffusers import AutoencoderKLWan

    from tpu_wan.models import checkpoints
    from tpu_wan.models.vae import AUTOENCODER_DEFAULTS

    signature = inspect.signature(AutoencoderKLWan.__init__).parameters
    defaults = {k: p.default for k, p in signature.items() if k != "self"}
    assert AUTOENCODER_DEFAULTS == defaults
    bare = tmp_path / "bare" / "vae"
    bare.mkdir(parents=True)
    (bare / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "clip_output": True}))
    packaged = [checkpoints.PACKAGED_CONFIGS / name / "vae" for name in checkpoints.PACKAGED_MODELS.values()]
    for vae_path in [tiny_path / "vae", real_path / "vae", bare, *packaged]:
        theirs, _, _ = AutoencoderKLWan.extract_init_dict(AutoencoderKLWan.load_config(vae_path))
        ours = load_config(vae_path)
        constructor = json.loads(json.dumps({**defaults, **theirs}))  # tuples as lists
        assert json.loads(json.dumps(ours)) == constructor and ours.z_dim == constructor["z_dim"], vae_path
    with pytest.raises(TypeError, match="read-only"):
        ours["z_dim"] = 1
    shutil.rmtree(bare.parent)


# The Wan 2.2 TI2V-5B VAE (z48, residual up blocks whose DupUp3D shortcut drops frames on the first chunk, 2x2
# pixel patches): tpu_wan.models.tiny's narrow config with the published latent statistics.


@pytest.fixture(scope="module")
def ti2v_oracle(ti2v_vae):
    """diffusers' frames for the tiny Wan 2.2 VAE at each latent frame count."""
    latents = _latents(max(TI2V_FRAME_COUNTS), TI2V_HW, channels=48)
    return latents, {f: diffusers_frames(ti2v_vae[1], latents[:, :, :f]) for f in TI2V_FRAME_COUNTS}


@pytest.fixture(scope="module")
def ti2v_decoder(ti2v_vae):
    return VaeDecoder(ti2v_vae[0], _mesh())


def test_ti2v_vae_matches_diffusers(ti2v_decoder, ti2v_oracle):
    latents, ref = ti2v_oracle
    errs, ours = {}, {}
    for f in TI2V_FRAME_COUNTS:
        ours[f] = ti2v_decoder.decode(latents[:, :, :f])
        assert ours[f].shape == (1, 4 * (f - 1) + 1, 16 * TI2V_HW[0], 16 * TI2V_HW[1], 3)
        errs[f] = _max_err(ours[f], ref[f])
    print("Wan 2.2 float32 max abs err per latent frame count:", errs)
    assert max(errs.values()) <= VAE_F32_ATOL, errs
    # Causal, as Wan 2.1's: fewer latent frames decode to a prefix, bit for bit (the tests below rely on it).
    f_max, f_min = max(TI2V_FRAME_COUNTS), min(TI2V_FRAME_COUNTS)
    np.testing.assert_array_equal(ref[f_min], ref[f_max][:, : ours[f_min].shape[1]])
    np.testing.assert_array_equal(ours[f_min], ours[f_max][:, : ours[f_min].shape[1]])


def _prefix_errs(ours, ref, counts=TI2V_FRAME_COUNTS):
    """Max abs error of each latent frame count's frames, from one decode of the most."""
    return {f: _max_err(ours[:, : 4 * (f - 1) + 1], ref[:, : 4 * (f - 1) + 1]) for f in counts}


def test_ti2v_bfloat16_close_to_diffusers_float32(ti2v_vae, ti2v_oracle):
    latents, ref = ti2v_oracle
    decoder = VaeDecoder(ti2v_vae[0], _mesh(), dtype="bfloat16")
    errs = _prefix_errs(decoder.decode(latents), ref[max(TI2V_FRAME_COUNTS)])
    print("Wan 2.2 bfloat16 max abs err per latent frame count:", errs)
    assert max(errs.values()) <= VAE_BF16_ATOL, errs


def test_ti2v_sharded_decode_equals_unsharded(ti2v_vae, ti2v_decoder):
    # On the 2x4 mesh the activations go from replicated (2x3 latents) to H over tp, H over all 8 devices and W
    # over all 8 as they grow.
    latents = _latents(max(TI2V_FRAME_COUNTS), TI2V_HW, seed=1, channels=48)
    sharded, unsharded = VaeDecoder(ti2v_vae[0], _mesh(2, 4)).decode(latents), ti2v_decoder.decode(latents)
    print("Wan 2.2 2x4 vs 1x1 mesh max abs diff per latent frame count:", _prefix_errs(sharded, unsharded))
    np.testing.assert_allclose(sharded, unsharded, rtol=0, atol=VAE_SHARDED_ATOL)


def test_ti2v_real_config_params_are_diffusers_decoder(ti2v_vae):
    """The published TI2V-5B VAE config: every decoder.* and post_quant_conv.* tensor of diffusers' model (built
    without weights) is one of our parameters, reshapeable to its shape, and nothing else is."""
    import accelerate
    from diffusers import AutoencoderKLWan

    from tpu_wan.models import checkpoints
    from tpu_wan.models.vae_modules import to_jax_layout

    config = load_config(checkpoints.PACKAGED_CONFIGS / "Wan2.2-TI2V-5B-Diffusers" / "vae")
    assert (config.z_dim, config.is_residual, config.patch_size, config.out_channels) == (48, True, 2, 12)
    with accelerate.init_empty_weights():
        theirs = {k: tuple(v.shape) for k, v in AutoencoderKLWan(**config).state_dict().items()
                  if k.startswith(("decoder.", "post_quant_conv."))}
    ours = {key: v.shape[len(keys) > 1:] for path, v in nnx.to_flat_state(_abstract_params(config))
            for keys in [torch_keys(path, v.shape)] for key in keys}
    assert sorted(ours) == sorted(theirs)
    for key, shape in theirs.items():  # a zero-strided stand-in of the torch tensor: no memory
        assert to_jax_layout(np.broadcast_to(np.float32(0), shape), ours[key]).shape == ours[key], key
    print(f"TI2V-5B decoder: {len(ours)} tensors, {sum(np.prod(s) for s in ours.values()) / 1e6:.1f}M parameters")
    # A residual up block's keys: resnets, the upsampler (no list), no weights for the DupUp3D shortcut.
    assert "decoder.up_blocks.0.upsampler.time_conv.weight" in ours
    assert "decoder.up_blocks.2.upsampler.resample.1.weight" in ours
    assert not any("avg_shortcut" in key for key in ours)


def test_weights_of_another_vae_kind_are_refused(tiny_path, ti2v_vae, tmp_path):
    # The Wan 2.1 VAE's weights under the Wan 2.2 config: the error names the kind the config asked for.
    import shutil

    (tmp_path / "vae").mkdir()
    shutil.copy(ti2v_vae[0] / "vae" / "config.json", tmp_path / "vae")
    shutil.copy(tiny_path / "vae" / WEIGHTS_FILE, tmp_path / "vae")
    with pytest.raises(ValueError, match=r"is this a Wan 2\.2 AutoencoderKLWan \(z_dim=48, is_residual=True, "
                                         r"patch_size=2\)\?"):
        VaeDecoder(tmp_path, _mesh())
    with pytest.raises(ValueError, match=r"expected out_channels = 3 x patch_size\^2 = 12 \(RGB pixels\), found "
                                         r"out_channels=3 patch_size=2"):
        WanVaeDecoder({**ti2v_vae[1].config, "out_channels": 3})


# The Pallas convolution (tpu_wan.kernels.causal_conv, interpreted on this CPU; TPU runs take it by default): the
# same decode against diffusers, on one device and split over meshes, where it exchanges the halo itself.


@pytest.mark.parametrize("mesh", [(1, 1), (2, 4), (1, 4)], ids=lambda m: f"mesh{m[0]}x{m[1]}")
def test_pallas_conv_decode_matches_diffusers(tiny_path, tiny_oracle, mesh):
    # 2x4: W over all 8 devices, then over tp once the latents are narrower; 1x4 with latents 8x6: W does not
    # divide, H is split (rows exchanged instead of columns).
    latents, ref = tiny_oracle
    decoder = VaeDecoder(tiny_path, _mesh(*mesh), conv="pallas")
    ours = decoder.decode(latents)
    errs = _prefix_errs(ours, ref[max(FRAME_COUNTS)], FRAME_COUNTS)
    print(f"pallas conv on {mesh}: max abs err per latent frame count:", errs)
    assert max(errs.values()) <= VAE_F32_ATOL, errs
    if mesh == (1, 4):
        h_split = _latents(2, (8, 6), seed=3)
        err = _max_err(decoder.decode(h_split), VaeDecoder(tiny_path, _mesh(), conv="xla").decode(h_split))
        print(f"8x6 latents, H split over 4: max abs diff from XLA's convolution {err:.2e}")
        assert err <= VAE_SHARDED_ATOL


def test_ti2v_pallas_conv_decode_matches_diffusers(ti2v_vae, ti2v_oracle):
    latents, ref = ti2v_oracle
    ours = VaeDecoder(ti2v_vae[0], _mesh(2, 4), conv="pallas").decode(latents)
    errs = _prefix_errs(ours, ref[max(TI2V_FRAME_COUNTS)])
    print("Wan 2.2 pallas conv on 2x4: max abs err per latent frame count:", errs)
    assert max(errs.values()) <= VAE_F32_ATOL, errs


def test_unknown_conv_is_refused(tiny_path):
    with pytest.raises(UserError, match=r"vae conv: expected one of \['auto', 'xla', 'pallas'\], found 'cudnn'"):
        VaeDecoder(tiny_path, _mesh(), conv="cudnn")
    assert VaeDecoder(tiny_path, _mesh()).conv == "xla"  # auto on CPU devices


def test_a_pass_where_a_layer_fits_no_kernel_block_runs_xla_for_every_layer(tiny_path, tiny_oracle, monkeypatch):
    """A lone XLA convolution beside the kernel calls compiled for minutes: where some layer fits no block (here
    those of 16 channels in, not the 8-channel ones), the whole pass takes XLA's convolutions, and still equals
    diffusers."""
    from tpu_wan.kernels import causal_conv

    def no_block_for_the_widest(x, weight, *args, **kwargs):
        if weight.shape[-2] >= 16:
            raise causal_conv.NoFit("no block fits (test)")
        return kernel(x, weight, *args, **kwargs)

    kernel = causal_conv.causal_conv
    latents, ref = tiny_oracle
    decoder = VaeDecoder(tiny_path, _mesh(), conv="pallas")
    monkeypatch.setattr(causal_conv, "causal_conv", no_block_for_the_widest)
    frames = decoder.decode(latents[:, :, :2])
    assert decoder.conv_for(latents[:, :, :2].shape) == "xla" and decoder.conv == "pallas"
    assert _max_err(frames, ref[2]) <= VAE_F32_ATOL
    monkeypatch.undo()
    fresh = VaeDecoder(tiny_path, _mesh(), conv="pallas")
    fresh.decode(latents[:, :, :2])
    assert fresh.conv_for(latents[:, :, :2].shape) == "pallas"
