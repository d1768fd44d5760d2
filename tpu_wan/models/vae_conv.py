"""The VAE's causal convolutions of activations split over a mesh: XLA's convolution, or the Pallas kernel
(tpu_wan.kernels.causal_conv) per chip with the halo exchange written out.

XLA's partitioner adds a split convolution's halo itself; a Pallas call is opaque to it, so `pallas` runs under
`shard_map`: each chip takes its neighbours' edge column (or row) along the split axes (`ppermute`; the chips at
the edges of the frame receive zeros, which is the convolution's 'same' padding), pads its block to a whole number
of sublanes along W, runs the kernel and drops the padding again. All of a decoder's convolutions take the same
path where they can: an XLA convolution beside Pallas calls took on their operands' layout and compiled for
minutes. A layer no kernel block fits (Wan 2.2's 1024 -> 1024 channels: a weight tile alone is over the budget)
falls back to XLA's convolution; where one does, the whole pass takes XLA's (vae.VaeHalf.conv_for).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tpu_wan.kernels.kernel_tiling import NUM_SUBLANES

CONVS = ("xla", "pallas")  # --vae_conv; "auto": pallas where the mesh is TPU chips, else xla
Conv = Callable[[jax.Array, jax.Array, jax.Array, jax.lax.Precision], jax.Array]


_fallbacks: list | None = None  # where recording_fallbacks collects the shapes of layers no kernel block fits


@contextlib.contextmanager
def recording_fallbacks(into: list):
    """Within it, every layer `pallas_conv` hands to XLA's convolution (NoFit) appends its input shape to `into`."""
    global _fallbacks
    previous, _fallbacks = _fallbacks, into
    try:
        yield into
    finally:
        _fallbacks = previous


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


def _halo(x: jax.Array, axis: int, axes, mesh, width: int, extra: int = 0) -> jax.Array:
    """x's block, split along `axis` over the mesh `axes`, with `width` (0 or 1) more rows/columns on each side: its
    neighbours' (zeros at the frame's edges), then `extra` zero columns; one concatenation, one copy."""
    zeros = lambda n: jnp.zeros((*x.shape[:axis], n, *x.shape[axis + 1:]), x.dtype)  # noqa: E731
    if width == 0:
        return jnp.concatenate([x, zeros(extra)], axis=axis) if extra else x
    names = axes if isinstance(axes, tuple) else (axes,)
    n = math.prod(mesh.shape[a] for a in names)
    edge = lambda index: jax.lax.slice_in_dim(x, index, index + 1, axis=axis)  # noqa: E731
    from_left = jax.lax.ppermute(edge(x.shape[axis] - 1), names, [(i, i + 1) for i in range(n - 1)])
    from_right = jax.lax.ppermute(edge(0), names, [(i + 1, i) for i in range(n - 1)])
    return jnp.concatenate([from_left, x, from_right, *([zeros(extra)] if extra else [])], axis=axis)


def pallas_conv(mesh, spec: P, *, interpret: bool = False) -> Conv:
    """xla_conv's contract for activations laid out as `spec` ([V T H W C]) on `mesh`, by the Pallas kernel."""
    from tpu_wan.kernels.causal_conv import NoFit, causal_conv

    spec = P(*spec, *([None] * (5 - len(spec))))

    def conv(x, weight, bias, precision):
        _, kh, kw, _, _ = weight.shape

        def local(x, weight, bias):  # this chip's [v T+kt-1 h w C]
            w = x.shape[3]
            extra = -w % NUM_SUBLANES  # columns to whole sublanes, computed and dropped
            # The unsplit axes' zero border (and the extra columns) in one pad, the split ones' halo in one concat:
            # every copy of a layer's input is a whole activation (1.2 GiB at 480p on one chip).
            rows = (kh // 2, kh // 2) if spec[2] is None else (0, 0)
            columns = (kw // 2, kw // 2 + extra) if spec[3] is None else (0, 0)
            if rows != (0, 0) or columns != (0, 0):
                x = jnp.pad(x, ((0, 0), (0, 0), rows, columns, (0, 0)))
            if spec[2] is not None:
                x = _halo(x, 2, spec[2], mesh, kh // 2)
            if spec[3] is not None:
                x = _halo(x, 3, spec[3], mesh, kw // 2, extra)
            return causal_conv(x, weight, bias, precision=precision, interpret=interpret)[:, :, :, :w]

        try:
            return jax.shard_map(local, mesh=mesh, in_specs=(spec, P(), P()), out_specs=spec, check_vma=False)(
                x, weight, bias)
        except NoFit:  # e.g. Wan 2.2's 1024-channel layers: their weight tiles alone exceed the VMEM budget
            if _fallbacks is not None:
                _fallbacks.append(x.shape)
            return xla_conv(x, weight, bias, precision)

    return conv
