"""Flops of one HLO instruction that multiplies matrices, counted as XLA's cost analysis counts them
(HloCostAnalysis): a dot, a convolution (XLA:TPU writes matmuls as convolutions) or a custom call whose backend
config carries a cost estimate (a Pallas kernel's). tpu_wan.tpu.hlo adds these up over the loop trips XLA's own
count leaves out."""

from __future__ import annotations

import math
import re

import numpy as np

_CONTRACTING = re.compile(r"\blhs_contracting_dims=\{([\d,]*)\}")
_DIM_LABELS = re.compile(r"\bdim_labels=(\w+)_(\w+)->(\w+)")
_WINDOW = re.compile(r"\bwindow=\{([^}]*)\}")
_GROUPS = re.compile(r"\b(feature|batch)_group_count=(\d+)")
_KERNEL_FLOPS = re.compile(r'\\?"cost_estimate\\?":\s*\{\\?"flops\\?":\s*\\?"?(\d+)')


def flops(op: str, attributes: str, out: list[int], operands: list[list[int]]) -> int:
    """Flops of an instruction `op` with result shape `out`, its first operands' shapes and the text after its
    opening parenthesis (`attributes`: operands, then dimension numbers, window, backend config); 0 for an op that
    multiplies no matrices."""
    if op == "dot" and (m := _CONTRACTING.search(attributes)) and operands:
        return 2 * math.prod(out) * math.prod(operands[0][int(d)] for d in m.group(1).split(",") if d)
    if op == "convolution" and (m := _DIM_LABELS.search(attributes)) and len(operands) == 2:
        return _convolution_flops(m.groups(), attributes, *operands, out)
    if op == "custom-call" and (m := _KERNEL_FLOPS.search(attributes)):
        return int(m.group(1))
    return 0


def _convolution_flops(labels: tuple[str, str, str], rest: str, lhs: list[int], rhs: list[int], out: list[int]) -> int:
    """XLA's count of a convolution's flops (HloCostAnalysis::GetConvolutionFlops): 2 x input features per group x
    output features x batch per group x, per spatial dimension, the (kernel, output) position pairs that read an
    input element, not padding or dilation holes. XLA:TPU writes batched matmuls as convolutions whose windows are
    mostly padding, so the kernel's size alone would overcount them."""
    lhs_labels, rhs_labels, out_labels = labels
    spatial = sorted(c for c in lhs_labels if c.isdigit())
    window = _window(m.group(1) if (m := _WINDOW.search(rest)) else "", len(spatial))
    groups = {kind: int(n) for kind, n in _GROUPS.findall(rest)}
    fma = (lhs[lhs_labels.index("f")] // groups.get("feature", 1) * out[out_labels.index("f")]
           * (lhs[lhs_labels.index("b")] // groups.get("batch", 1)))
    for dim, w in zip(spatial, window):
        fma *= _valid_positions(lhs[lhs_labels.index(dim)], rhs[rhs_labels.index(dim)], out[out_labels.index(dim)], w)
    return 2 * fma


def _window(text: str, rank: int) -> list[dict[str, int]]:
    """Per spatial dimension of an HLO window (`size=3x3 stride=2x1 pad=1_1x0_0 lhs_dilate=... rhs_dilate=...`):
    size, stride, padding low and high, base (lhs) and window (rhs) dilation."""
    dims = [{"size": 1, "stride": 1, "low": 0, "high": 0, "base": 1, "dilate": 1} for _ in range(rank)]
    keys = {"size": ("size",), "stride": ("stride",), "pad": ("low", "high"), "lhs_dilate": ("base",),
            "rhs_dilate": ("dilate",)}
    for field in text.split():
        key, _, value = field.partition("=")
        for dim, part in zip(dims, value.split("x") if key in keys else ()):
            dim.update(zip(keys[key], (int(v) for v in part.split("_"))))
    return dims


def _valid_positions(n_in: int, n_kernel: int, n_out: int, w: dict[str, int]) -> int:
    if (n_in == n_out == n_kernel == w["base"] and w["dilate"] == 1 and max(1, n_in - 1) == w["stride"]
            and w["low"] == w["high"] == 0):  # XLA's shortcut for a batch dimension written as a window
        return n_in
    out = np.arange(n_out)
    total = 0
    for k in range(n_kernel):
        undilated = out * w["stride"] - w["low"] + k * w["dilate"]
        total += int(((undilated % w["base"] == 0) & (undilated >= 0) & (undilated // w["base"] < n_in)).sum())
    return total
