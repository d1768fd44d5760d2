"""The VAE's causal convolutions of activations split over a mesh: XLA's convolution, or the Pallas kernel
(tpu_wan.kernels.causal_conv) per chip with the halo exchange written out.

XLA's partitioner adds a split convolution's halo itself; a Pallas call is opaque to it, so `pallas` runs under
`shard_map`: each chip takes its neighbours' edge column (or row) along the split axes (`ppermute`; the chips at
the edges of the frame receive zeros, which is the convolution's 'same' padding), pads its block to a whole number
of sublanes along W, runs the kernel and drops the padding again. All of a decoder's convolutions take the same
path: an XLA convolution beside Pallas calls took on their operands' layout and compiled for minutes.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tpu_wan.kernels.kernel_tiling import NUM_SUBLANES

CONVS = ("xla", "pallas")  # --vae_conv; "auto": pallas where the mesh is TPU chips, else xla
Conv = Callable[[jax.Array, jax.Array, jax.Array, jax.lax.Precision], jax.Array]


def resolve(conv: str, mesh) -> str:
    """The convolution a decode on `mesh` runs for the setting `conv` (auto, xla or pallas)."""
    if conv == "auto":
        return "pallas" if mesh.devices.flat[0].platform == "tpu" else "xla"
    return conv


def xla_conv(x: jax.Array, weight: jax.Array, bias: jax.Array, precision) -> jax.Array:
    """x [V T+kt-1 H W C] (kt - 1 cached frames first), weight [kt kh kw C O] -> [V T H W O], 'same' zero padding
    in H and W."""
    _, kh, kw, _, _ = weight.shape
    y = jax.lax.conv_general_dilated(
        x, weight, window_strides=(1, 1, 1), padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=precision)
    return y + bias


def _halo(x: jax.Array, axis: int, axes, mesh, width: int) -> jax.Array:
    """x's block with `width` (0 or 1) more rows/columns on each side of `axis`: its neighbours' along the mesh
    `axes` that split it, zeros at the frame's edges (and everywhere when `axes` is None)."""
    if width == 0:
        return x
    if axes is None:
        return jnp.pad(x, [(1, 1) if a == axis else (0, 0) for a in range(x.ndim)])
    names = axes if isinstance(axes, tuple) else (axes,)
    n = math.prod(mesh.shape[a] for a in names)
    edge = lambda index: jax.lax.slice_in_dim(x, index, index + 1, axis=axis)  # noqa: E731
    from_left = jax.lax.ppermute(edge(x.shape[axis] - 1), names, [(i, i + 1) for i in range(n - 1)])
    from_right = jax.lax.ppermute(edge(0), names, [(i + 1, i) for i in range(n - 1)])
    return jnp.concatenate([from_left, x, from_right], axis=axis)


def pallas_conv(mesh, spec: P, *, interpret: bool = False) -> Conv:
    """xla_conv's contract for activations laid out as `spec` ([V T H W C]) on `mesh`, by the Pallas kernel."""
    from tpu_wan.kernels.causal_conv import causal_conv

    spec = P(*spec, *([None] * (5 - len(spec))))

    def conv(x, weight, bias, precision):
        _, kh, kw, _, _ = weight.shape

        def local(x, weight, bias):  # this chip's [v T+kt-1 h w C]
            x = _halo(_halo(x, 2, spec[2], mesh, kh // 2), 3, spec[3], mesh, kw // 2)
            w = x.shape[3] - kw + 1
            x = jnp.pad(x, ((0, 0),) * 3 + ((0, -w % NUM_SUBLANES), (0, 0)))  # whole sublanes, extra columns dropped
            return causal_conv(x, weight, bias, precision=precision, interpret=interpret)[:, :, :, :w]

        return jax.shard_map(local, mesh=mesh, in_specs=(spec, P(), P()), out_specs=spec, check_vma=False)(
            x, weight, bias)

    return conv
