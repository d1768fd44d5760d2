"""The Pallas causal convolution (tpu_wan.kernels.causal_conv): interpreted on this CPU against a float64 sum over
taps written here, its tiles within VMEM at the real decoders' per-chip shapes, and compiled by the TPU compiler."""

import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tpu_wan.kernels import causal_conv

# float32 products summed over up to 27 taps x 40 channels in the kernel vs float64 here: measured <= 3e-6.
KERNEL_ATOL = 2e-5


def reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x [N T+kt-1 H+kh-1 W+kw-1 C] padded, weight [kt kh kw C O]: the sum over taps of shifted windows, float64."""
    kt, kh, kw, _, o = weight.shape
    n, t, h, w = x.shape[0], x.shape[1] - kt + 1, x.shape[2] - kh + 1, x.shape[3] - kw + 1
    out = np.zeros((n, t, h, w, o)) + bias.astype(np.float64)
    for dt in range(kt):
        for dh in range(kh):
            for dw in range(kw):
                window = x[:, dt:dt + t, dh:dh + h, dw:dw + w].astype(np.float64)
                out += window @ weight[dt, dh, dw].astype(np.float64)
    return out


@pytest.mark.parametrize("kernel, n, t, h, w, c, o", [
    ((3, 3, 3), 1, 4, 6, 8, 40, 24),  # a residual block's conv
    ((1, 3, 3), 2, 2, 4, 16, 8, 3),  # the upsamplers' 2D conv, two videos, three output channels (conv_out's)
    ((3, 1, 1), 1, 1, 3, 8, 16, 32),  # time_conv
    ((1, 1, 1), 1, 4, 2, 8, 12, 384),  # a shortcut, output channels in three 128-wide weight tiles
])
def test_kernel_equals_the_sum_over_taps(kernel, n, t, h, w, c, o, monkeypatch):
    kt, kh, kw = kernel
    # A small accumulator so the rows split into blocks, each with its own halo rows.
    monkeypatch.setattr(causal_conv, "ACC_BYTES", t * 2 * w * causal_conv.NUM_LANES * 4 * max(1, -(-o // 256)))
    rng = np.random.default_rng(sum(kernel) + n + c)
    x = rng.standard_normal((n, t + kt - 1, h + kh - 1, w + kw - 1, c)).astype(np.float32)
    weight = (rng.standard_normal((kt, kh, kw, c, o)) / np.sqrt(c * kt * kh * kw)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    th, tw, to = causal_conv.tiles(kernel, t, h, w, c, o, 4)
    assert th < h or h <= 2, (th, h)  # several row blocks
    got = causal_conv.causal_conv(jnp.asarray(x), jnp.asarray(weight), jnp.asarray(bias),
                                  precision=jax.lax.Precision.HIGHEST, interpret=True)
    err = float(np.abs(np.asarray(got, np.float64) - reference(x, weight, bias)).max())
    print(f"{kernel} x {list(x.shape)} -> {o}: tiles th={th} tw={tw} to={to}, max abs err vs float64 {err:.1e}")
    assert err <= KERNEL_ATOL


def test_widths_off_the_sublanes_are_refused():
    x = jnp.zeros((1, 3, 6, 12, 8))
    with pytest.raises(ValueError, match=r"expected W % 8 == 0 and 8 channels"):
        causal_conv.causal_conv(x, jnp.zeros((3, 3, 3, 8, 8)), jnp.zeros(8), interpret=True)  # W = 10


# Per-chip shapes of the real decoders' convolutions (T, H, W, C, O at each resolution; W already padded to 8):
# Wan 2.1 at 720p on 8 chips (latents 90x160, W over 8) and at 480p on 4 (60x104), TI2V-5B at 704p on one.
REAL_SHAPES = [
    ((3, 3, 3), 1, 90, 24, 384, 384), ((3, 3, 3), 4, 180, 40, 384, 384), ((3, 1, 1), 2, 180, 40, 384, 768),
    ((3, 3, 3), 4, 360, 80, 192, 192), ((1, 3, 3), 4, 720, 160, 192, 96), ((3, 3, 3), 4, 720, 160, 96, 96),
    ((3, 3, 3), 4, 720, 160, 96, 3), ((3, 3, 3), 4, 480, 208, 96, 96), ((3, 3, 3), 1, 60, 32, 384, 384),
    ((3, 3, 3), 4, 704, 640, 256, 256), ((3, 3, 3), 4, 704, 640, 256, 12), ((1, 1, 1), 1, 44, 80, 48, 48),
]


@pytest.mark.parametrize("kernel, t, h, w, c, o", REAL_SHAPES)
def test_real_shapes_fit_vmem(kernel, t, h, w, c, o):
    th, tw, to = causal_conv.tiles(kernel, t, h, w, c, o, 4)
    need = causal_conv.vmem_bytes(kernel, t, th, tw, c, to, 4)
    assert h % th == 0 and w % tw == tw % 8 == 0 and o % to == 0, (th, tw, to)
    assert need <= causal_conv.VMEM_BUDGET < causal_conv.VMEM_LIMIT, need


def test_vmem_bytes_by_hand():
    # 3x3x3, T 4, 8 rows of 16 columns, 96 -> 96 channels, float32: input block 6 x 10 x 24 (18 -> 24 sublanes) x
    # 128 lanes, weights 27 x 96 x 128, output 4 x 8 x 16 x 128, each twice, then three windows of the input and
    # three float32 results the size of the output block.
    block, weights, out = 6 * 10 * 24 * 128 * 4, 27 * 96 * 128 * 4, 4 * 8 * 16 * 128 * 4
    assert causal_conv.vmem_bytes((3, 3, 3), 4, 8, 16, 96, 96, 4) == 2 * (block + weights + out) + 3 * out + 3 * out


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed: nothing can compile for a TPU on this host")
@pytest.mark.parametrize("kernel, t, h, w, c, o", [
    ((3, 3, 3), 1, 60, 32, 384, 384),  # the widest layer at 480p on 4 chips (XLA's own: 26-48 s here)
    ((3, 3, 3), 2, 180, 40, 192, 384),  # 720p on 8 chips; its first tiles asked 33 MiB of a 32 MiB limit
    ((3, 3, 3), 4, 704, 640, 256, 256),  # TI2V-5B at 704p on one chip: blocks of columns
])
def test_compiles_for_tpu_at_decoder_shapes(kernel, t, h, w, c, o):
    # Mosaic refuses a kernel whose scoped VMEM exceeds the limit it is given: the tiles' estimate must hold.
    from tpu_wan.tpu import topology

    kt, kh, kw = kernel
    mesh = Mesh(np.array(topology.parse_target("v6e-8").devices()[:1]), ("x",))
    placed = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P()))  # noqa: E731
    fn = jax.jit(lambda x, w, b: causal_conv.causal_conv(x, w, b, precision=jax.lax.Precision.HIGHEST))
    start = time.perf_counter()
    x = placed((1, t + kt - 1, h + kh - 1, w + kw - 1, c))
    compiled = fn.lower(x, placed((*kernel, c, o)), placed((o,))).compile()
    print(f"tiles {causal_conv.tiles(kernel, t, h, w, c, o, 4)}: compiled in {time.perf_counter() - start:.1f} s")
    assert "tpu_custom_call" in compiled.as_text()


def test_a_layer_no_block_fits_falls_back_to_xla(monkeypatch, tiny_path):
    # The budget below the tiny VAE's smallest block: every layer falls back to XLA's convolution, same decode.
    from tpu_wan.models.vae import VaeDecoder
    from tpu_wan.runtime.mesh import make_mesh

    latents = np.random.default_rng(5).standard_normal((1, 16, 2, 4, 4)).astype(np.float32)
    mesh = make_mesh(1, 1, jax.devices()[:1])
    ours = VaeDecoder(tiny_path, mesh, conv="pallas")
    monkeypatch.setattr(causal_conv, "VMEM_BUDGET", 1024)
    with pytest.raises(causal_conv.NoFit, match="no block of"):
        causal_conv.tiles((3, 3, 3), 1, 4, 8, 8, 8, 4)
    np.testing.assert_array_equal(ours.decode(latents), VaeDecoder(tiny_path, mesh, conv="xla").decode(latents))
