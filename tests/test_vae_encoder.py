"""The native Flax VAE encoder against diffusers' AutoencoderKLWan.encode (torch float32 and float64, the oracles)."""

import jax
import numpy as np
import pytest
import torch
from conftest import (
    BF16_OVER_DIFFUSERS,
    VAE_ENCODER_F64_RTOL,
    VAE_ENCODER_RTOL,
    VAE_SHARDED_ATOL,
    rel_err,
)
from safetensors.numpy import load_file, save_file

from tpu_wan.core.errors import UserError
from tpu_wan.models.vae import WEIGHTS_FILE
from tpu_wan.models.vae_encoder import VaeEncoder
from tpu_wan.runtime.mesh import make_mesh

FRAME_COUNTS = (1, 17)  # frame 0 alone (TI2V's one image); 4 more chunks with caches carried (and 81 = 1 + 4 x 20)
# Pixel sizes whose latent width splits over all 8 devices of a 2x4 mesh with >= 2 columns each: Wan 2.1 (8x) 4x8
# latents, Wan 2.2 (16x) 2x16.
WAN21_HW = (32, 64)
WAN22_HW = (32, 256)
REAL_HW = (8, 16)


def _mesh(dp=1, tp=1):
    return make_mesh(dp, tp, devices=jax.devices()[: dp * tp])


def _video(frames, hw, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (1, 3, frames, *hw)).astype(np.float32)


def _torch_vae(root, dtype=torch.float32):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=dtype).eval()


def _diffusers_moments(vae, video, dtype=torch.float32) -> np.ndarray:
    with torch.no_grad():
        return vae._encode(torch.from_numpy(video).to(dtype)).double().numpy()


@pytest.fixture(scope="module", params=["wan21", "wan22"])
def kind(request, tiny_path, ti2v_vae):
    """(VAE folder, pixel size) of the tiny Wan 2.1 VAE (the tiny checkpoint's) and the tiny Wan 2.2 VAE."""
    return (tiny_path, WAN21_HW) if request.param == "wan21" else (ti2v_vae[0], WAN22_HW)


@pytest.fixture(scope="module")
def oracle(kind):
    """diffusers' encoder output (the distribution's parameters) and mode at each frame count."""
    root, hw = kind
    vae = _torch_vae(root)
    out = {}
    for f in FRAME_COUNTS:
        video = _video(f, hw)
        with torch.no_grad():
            mode = vae.encode(torch.from_numpy(video)).latent_dist.mode().numpy()  # the pipelines' "argmax"
        out[f] = video, _diffusers_moments(vae, video), mode
    return out


@pytest.mark.parametrize("mesh", [(1, 1), (2, 4)], ids=lambda m: f"mesh{m[0]}x{m[1]}")
def test_encoder_matches_diffusers(kind, oracle, mesh):
    encoder = VaeEncoder(kind[0], _mesh(*mesh))
    errs = {}
    for f, (video, moments, mode) in oracle.items():
        ours = encoder.moments(video)
        assert ours.shape == moments.shape
        errs[f] = rel_err(ours, moments)
        np.testing.assert_array_equal(encoder.encode(video), ours[:, : encoder.config.z_dim])
        assert rel_err(ours[:, : encoder.config.z_dim], mode) <= VAE_ENCODER_RTOL
    print(f"encoder float32 rel err per frame count on {mesh}:", errs)
    assert max(errs.values()) <= VAE_ENCODER_RTOL, errs


def test_sharded_encode_equals_unsharded(kind, oracle):
    video = oracle[max(FRAME_COUNTS)][0]
    unsharded = VaeEncoder(kind[0], _mesh()).moments(video)
    for mesh in [(4, 2), (1, 8)]:
        np.testing.assert_allclose(VaeEncoder(kind[0], _mesh(*mesh)).moments(video), unsharded, rtol=0,
                                   atol=VAE_SHARDED_ATOL)


def test_real_config_encoder_close_to_float64(real_vae):
    """The real Wan 2.1 widths, where diffusers' own float32 strays more than VAE_ENCODER_RTOL: both against
    diffusers in float64."""
    root, _ = real_vae
    vae64 = _torch_vae(root, torch.float64)
    encoder = VaeEncoder(root, _mesh())
    for f in FRAME_COUNTS:
        video = _video(f, REAL_HW)
        err = rel_err(encoder.moments(video), _diffusers_moments(vae64, video, torch.float64))
        print(f"real config, {f} frames: float32 vs float64 rel err {err:.2e}")
        assert err <= VAE_ENCODER_F64_RTOL


def test_bfloat16_as_close_as_diffusers_bfloat16(kind, oracle):
    """bfloat16 weights and activations vs diffusers' float32, against diffusers' own bfloat16 encode."""
    root, _ = kind
    video, moments, _ = oracle[max(FRAME_COUNTS)]
    ours = rel_err(VaeEncoder(root, _mesh(), "bfloat16").moments(video), moments)
    theirs = rel_err(_diffusers_moments(_torch_vae(root, torch.bfloat16), video, torch.bfloat16), moments)
    print(f"bfloat16 rel err: ours {ours:.2e}, diffusers {theirs:.2e}")
    assert ours <= BF16_OVER_DIFFUSERS * theirs


@pytest.mark.parametrize("shape", [(1, 3, 3, 32, 64), (1, 3, 5, 36, 64), (1, 4, 5, 32, 64), (3, 5, 32, 64)])
def test_unencodable_shapes_are_refused(tiny_path, shape):
    with pytest.raises(UserError, match="vae encoder input: expected"):
        VaeEncoder(tiny_path, _mesh()).encode(np.zeros(shape, np.float32))


def test_missing_or_extra_encoder_weights_are_refused(tiny_path, tmp_path):
    weights = load_file(tiny_path / "vae" / WEIGHTS_FILE)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text((tiny_path / "vae" / "config.json").read_text())
    save_file({k: v for k, v in weights.items() if k != "encoder.conv_in.weight"}, tmp_path / "vae" / WEIGHTS_FILE)
    with pytest.raises(UserError, match=r"missing \['encoder.conv_in.weight'\]"):
        VaeEncoder(tmp_path, _mesh())
    save_file({**weights, "encoder.extra.weight": np.zeros(1, np.float32)}, tmp_path / "vae" / WEIGHTS_FILE)
    with pytest.raises(UserError, match=r"unused encoder keys \['encoder.extra.weight'\]"):
        VaeEncoder(tmp_path, _mesh())
