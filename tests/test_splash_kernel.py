"""The base-2 splash (flash) attention forward kernel against softmax attention in float64.

Like upstream's splash attention tests, the bodies (SplashKernelBodies) run twice: SplashKernelTest runs the
compiled kernel, is marked `tpu` and skipped off TPU; SplashKernelInterpretTest runs the same bodies through
Pallas' TPU interpreter on CPU. (The twins share a body class rather than inherit one from the other: pytest
passes a class's marks on to its subclasses, so an interpret subclass would be marked `tpu` too.) Shapes are
small, as the interpreter is slow; they still cover lengths that are and are not block multiples, several key
blocks and compute chunks per block, windows, cross-attention and both dtypes, plus seeded random shapes.
Every bfloat16 input also runs upstream splash attention, the yardstick for bf16 error (_budget).
"""

import dataclasses
import functools
import inspect
import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import BF16_OVER_SPLASH, KERNEL_BF16_RTOL, KERNEL_F32_RTOL, UNMASKED_MIN_ERR, rel_err
from wan_shapes import GENERATIONS, default_blocks

from tpu_wan.kernels.kernel_tiling import vmem_bytes, vmem_limit_for
from tpu_wan.kernels.splash_exp2 import (
    VMEM_LIMIT_BYTES,
    BlockSizes,
    attended_pairs,
    attention_reference,
    splash_attention,
)
from tpu_wan.run.attention_tuning import reference_f64
from tpu_wan.runtime.attention import upstream_splash

SEED = 0


def _inputs(rng, n, q_len, kv_len, d, dtype, k_offset=0.0):
    """Fresh normal q, k, v (k optionally with a per-head mean offset, as real keys often have)."""
    q = rng.standard_normal((n, q_len, d))
    k = rng.standard_normal((n, kv_len, d)) + k_offset * rng.standard_normal((n, 1, d))
    v = rng.standard_normal((n, kv_len, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _reference64(q, k, v, *, scale=None, window_size=None, round_p=False):
    """Softmax attention in float64 on the (already rounded) inputs; round_p: P rounded to bf16 before P.V."""
    return reference_f64(q, k, v, scale=scale, window_size=window_size, round_p=_bf16 if round_p else None)


def _bf16(x):
    """x rounded to bfloat16 (to nearest even), back in float64."""
    return np.asarray(x, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)


def _budget(q, k, v, ref, *, scale=None, window_size=None, k_smooth=False, pv_f32=False, upstream_err):
    """The error ours may have on these bf16 inputs: upstream's measured error and, in quadrature, the error of
    each rounding ours makes that upstream does not, each alone in float64 (tests/conftest.py, BF16_OVER_SPLASH):
    P to bf16 for P.V (unless pv_f32); the centred keys to bf16 (k_smooth); q * scale * log2(e) to bf16, beyond
    what upstream's own rounding of q * scale costs (all of it where upstream's is exact: a power-of-two scale).
    Returns (budget, the extras by name)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def err(q=q, k=k, round_p=False):
        return rel_err(_reference64(q, k, v, scale=scale, window_size=window_size, round_p=round_p), ref)

    base2 = scale * math.log2(math.e)
    fold, upstream_fold = err(q=_bf16(q * base2) / base2), err(q=_bf16(q * scale) / scale)
    extras = {"fold": math.sqrt(max(0.0, fold**2 - upstream_fold**2))}
    if not pv_f32:
        extras["p"] = err(round_p=True)
    if k_smooth:
        mean = k.mean(axis=1, keepdims=True)
        extras["k_smooth"] = err(k=_bf16(k - mean) + mean)
    return math.sqrt(upstream_err**2 + sum(e**2 for e in extras.values())), extras


def _rtol(dtype):
    return KERNEL_F32_RTOL if jnp.dtype(dtype) == jnp.float32 else KERNEL_BF16_RTOL


f32, bf16 = jnp.float32, jnp.bfloat16
DEFAULT = (512, 1024, 512)
# (dtype, heads, L, S, D, window_size, k_smooth, (bq, bkv, bkv_compute), scale)
CASES = [
    (f32, 1, 128, 128, 64, None, False, (64, 128, 64), None),  # block multiples, 2 chunks per key block
    (f32, 3, 200, 200, 128, None, False, (64, 128, 64), 0.37),  # padded queries and keys, a given scale
    (f32, 16, 128, 128, 64, 20, False, (128, 128, 64), None),  # many heads, window
    (f32, 3, 300, 300, 64, 50, True, (64, 128, 64), None),  # window: skipped, partial and full chunks
    (f32, 1, 300, 300, 128, 0, False, (64, 128, 64), None),  # window 0: each query sees only its own key
    (f32, 1, 300, 300, 64, 1000, False, (128, 256, 128), None),  # window wider than the sequence
    (f32, 1, 200, 77, 64, None, False, (64, 128, 64), None),  # cross-attention, S < bkv (bkv shrinks)
    (f32, 3, 128, 300, 128, None, True, (64, 256, 64), None),  # cross-attention, a padding-only chunk
    (f32, 1, 300, 300, 128, None, False, DEFAULT, None),  # default blocks shrink to the sequence
    (bf16, 1, 256, 256, 128, None, False, (128, 256, 128), 0.2),  # block multiples
    (bf16, 3, 200, 200, 64, None, False, (64, 128, 64), None),
    (bf16, 16, 128, 128, 128, 32, True, (128, 128, 64), None),
    (bf16, 3, 300, 300, 128, 70, True, (64, 256, 128), None),
    (bf16, 1, 512, 200, 64, None, True, (128, 128, 64), None),  # cross-attention
    (bf16, 3, 77, 512, 128, None, False, (64, 256, 128), None),  # cross-attention, short queries
    (bf16, 2, 264, 264, 64, 48, False, (64, 128, 64), None),  # window without k_smooth
]


def _random_cases(seed, count):
    """`count` cases (dtype, heads, L, S, D, window_size, k_smooth, blocks, input seed) drawn from a fixed seed:
    the 8 (dtype, window, k_smooth) combinations in a shuffled order, heads in 1..16, D in {64, 128}, blocks from
    {64, 128} (at most 16 x 4 x 4 grid steps: the interpreter's cost is per step), lengths <= 256 that are block
    multiples or not (a window needs L == S)."""
    rng = np.random.default_rng(seed)

    def length(block):
        return int(block * rng.integers(1, 256 // block + 1) if rng.random() < 0.5 else rng.integers(17, 257))

    combos = [(dtype, window, smooth) for dtype in (f32, bf16) for window in (False, True) for smooth in (False, True)]
    cases = []
    for i in rng.permutation(len(combos))[:count]:
        dtype, window, k_smooth = combos[i]
        bq, bc = int(rng.choice([64, 128])), int(rng.choice([64, 128]))
        bkv = bc * int(rng.integers(1, 3))
        q_len = length(bq)
        kv_len = q_len if window or rng.random() < 0.3 else length(bkv)
        w = int(rng.integers(0, q_len)) if window else None
        cases.append((dtype, int(rng.integers(1, 17)), q_len, kv_len, int(rng.choice([64, 128])), w, k_smooth,
                      (bq, bkv, bc), int(rng.integers(2**31))))
    return cases


RANDOM_CASES = _random_cases(seed=2024, count=8)
TPU_BLOCKS = default_blocks()


class SplashKernelBodies:
    """The test bodies; SplashKernelTest and SplashKernelInterpretTest run them."""

    __test__ = False
    INTERPRET = False

    def setup_method(self):
        if not self.INTERPRET and jax.default_backend() != "tpu":
            pytest.skip("the compiled kernel needs a TPU (the interpret subclass runs these bodies on CPU)")

    def _blocks(self, bq, bkv, bc):
        if not self.INTERPRET and bc % 128:  # compiled kernels need 128-lane logits tiles
            bc, bkv = 128, -(-bkv // 128) * 128
        return BlockSizes(bq=bq, bkv=bkv, bkv_compute=bc)

    def _check(self, out, ref, dtype, q_shape):
        assert out.shape == q_shape and out.dtype == dtype
        assert np.isfinite(np.asarray(out, np.float32)).all()
        err = rel_err(out, ref)
        assert err <= _rtol(dtype), err
        return err

    def _check_bf16_against_upstream(self, err, q, k, v, ref, blocks, scale=None, window_size=None, **kwargs):
        """Ours (error `err`) within BF16_OVER_SPLASH of upstream splash's error on the same inputs, after the
        roundings ours makes by design (_budget). Returns upstream's error."""
        up = upstream_splash(q, k, v, block_sizes=blocks, scale=scale, window_size=window_size,
                             interpret=self.INTERPRET)
        up_err = rel_err(up, ref)
        budget, extras = _budget(q, k, v, ref, scale=scale, window_size=window_size, upstream_err=up_err, **kwargs)
        print(f"bf16 rel err: ours {err:.3e}, upstream splash {up_err:.3e} (ours / upstream {err / up_err:.3f}), "
              f"budget {budget:.3e} (ours / budget {err / budget:.3f}), extras "
              + ", ".join(f"{name} {e:.2e}" for name, e in extras.items()))
        assert err <= BF16_OVER_SPLASH * budget, (
            f"ours {err:.3e} > {BF16_OVER_SPLASH} x budget {budget:.3e} (upstream splash {up_err:.3e}, "
            f"extras {extras})")
        return up_err

    def _run(self, q, k, v, ref, dtype, blocks, **kwargs):
        """Ours on q, k, v checked against `ref` (and for bf16 against upstream splash)."""
        out = splash_attention(q, k, v, block_sizes=blocks, interpret=self.INTERPRET, **kwargs)
        err = self._check(out, ref, dtype, q.shape)
        if jnp.dtype(dtype) == jnp.bfloat16:
            self._check_bf16_against_upstream(err, q, k, v, ref, blocks, **kwargs)

    @pytest.mark.parametrize("dtype,n,q_len,kv_len,d,window,k_smooth,blocks,scale", CASES)
    def test_matches_reference(self, dtype, n, q_len, kv_len, d, window, k_smooth, blocks, scale):
        rng = np.random.default_rng([SEED, n, q_len, kv_len, d, 0 if window is None else window + 1, k_smooth])
        q, k, v = _inputs(rng, n, q_len, kv_len, d, dtype)
        self._run(q, k, v, _reference64(q, k, v, scale=scale, window_size=window), dtype, self._blocks(*blocks),
                  scale=scale, window_size=window, k_smooth=k_smooth)

    @pytest.mark.parametrize("dtype,n,q_len,kv_len,d,window,k_smooth,blocks,seed", RANDOM_CASES,
                             ids=[f"{jnp.dtype(c[0]).name}-N{c[1]}-L{c[2]}-S{c[3]}-D{c[4]}-W{c[5]}-ks{int(c[6])}-"
                                  f"b{'x'.join(map(str, c[7]))}" for c in RANDOM_CASES])
    def test_random_shapes(self, dtype, n, q_len, kv_len, d, window, k_smooth, blocks, seed):
        q, k, v = _inputs(np.random.default_rng(seed), n, q_len, kv_len, d, dtype)
        self._run(q, k, v, _reference64(q, k, v, window_size=window), dtype, self._blocks(*blocks),
                  window_size=window, k_smooth=k_smooth)

    def test_pv_f32_bf16(self):
        # With P.V in float32 and D = 128 (scale 128^-0.5: upstream's q * scale is rounded too) ours makes
        # exactly upstream's roundings, so it is held to upstream's error itself, no extras.
        rng = np.random.default_rng([SEED, 1])
        q, k, v = _inputs(rng, 3, 200, 200, 128, bf16)
        ref = _reference64(q, k, v, window_size=40)
        blocks = self._blocks(64, 128, 64)
        out = splash_attention(q, k, v, block_sizes=blocks, window_size=40, pv_f32=True, interpret=self.INTERPRET)
        err = self._check(out, ref, bf16, q.shape)
        up_err = self._check_bf16_against_upstream(err, q, k, v, ref, blocks, window_size=40, pv_f32=True)
        assert err <= BF16_OVER_SPLASH * up_err, (err, up_err)
        # P.V in bf16 (the default) adds no more than P's own rounding, in quadrature
        out = splash_attention(q, k, v, block_sizes=blocks, window_size=40, interpret=self.INTERPRET)
        p_err = rel_err(_reference64(q, k, v, window_size=40, round_p=True), ref)
        assert rel_err(out, ref) <= BF16_OVER_SPLASH * math.hypot(err, p_err), (rel_err(out, ref), err, p_err)

    @pytest.mark.parametrize("blocks", sorted(TPU_BLOCKS, key=dataclasses.astuple), ids=str)
    def test_the_blocks_tpu_chips_get_on_ragged_lengths(self, blocks):
        # The default blocks a v5e/v6e/v5p chip gets at the Wan runs' shapes (wan_shapes), on lengths that leave
        # the last query block (and, for self-attention, the last key block) ragged: a key block of 4,096 is
        # self-attention (L = S), one of 512 the cross-attention over 512 text tokens.
        cross = blocks.bkv == 512
        q_len = blocks.bq + 109
        kv_len = 512 if cross else blocks.bkv + 300
        q_len = q_len if cross else kv_len
        q, k, v = _inputs(np.random.default_rng([SEED, *dataclasses.astuple(blocks)]), 1, q_len, kv_len, 128, bf16)
        limit = max(vmem_limit_for(kind) for kind in GENERATIONS.values())  # 32 MiB on each
        if not self.INTERPRET:
            limit = vmem_limit_for(jax.devices()[0].device_kind)
            if vmem_bytes(blocks, 128, bf16) > limit:
                pytest.skip(f"{blocks} is for v5e, v6e and v5p chips, not {jax.devices()[0].device_kind}")
        out = splash_attention(q, k, v, block_sizes=blocks, interpret=self.INTERPRET, vmem_limit_bytes=limit)
        self._check(out, _reference64(q, k, v), bf16, q.shape)

    def test_k_smooth_float32_keys_with_mean(self):
        # Keys sharing a large mean make large logits whose float32 rounding (~2^-24 |s|) shows in the output;
        # centring the keys removes that row-constant part exactly.
        rng = np.random.default_rng([SEED, 3])
        q, k, v = _inputs(rng, 1, 136, 136, 128, f32, k_offset=100.0)
        ref = _reference64(q, k, v)
        kw = dict(block_sizes=self._blocks(64, 128, 64), interpret=self.INTERPRET)
        err_plain = rel_err(splash_attention(q, k, v, **kw), ref)
        err_smooth = self._check(splash_attention(q, k, v, k_smooth=True, **kw), ref, f32, q.shape)
        assert err_smooth < err_plain / 5, (err_smooth, err_plain)

    def test_padded_keys_must_be_masked(self):
        rng = np.random.default_rng([SEED, 4])
        q, k, v = _inputs(rng, 1, 200, 200, 64, f32)  # 200 keys padded to 256
        ref = _reference64(q, k, v)
        kw = dict(block_sizes=self._blocks(64, 128, 64), interpret=self.INTERPRET)
        self._check(splash_attention(q, k, v, **kw), ref, f32, q.shape)
        unmasked = splash_attention(q, k, v, _mask_padding=False, **kw)
        assert rel_err(unmasked, ref) > UNMASKED_MIN_ERR


@pytest.mark.tpu
class SplashKernelTest(SplashKernelBodies):
    """Compiled kernel; runs only on TPU (marked tpu, skipped elsewhere by setup_method)."""

    __test__ = True  # pytest collects Test* classes by default; this name follows upstream's


class SplashKernelInterpretTest(SplashKernelBodies):
    """The same bodies through Pallas' TPU interpreter on CPU."""

    __test__ = True
    INTERPRET = True


def test_attention_reference_takes_the_kernels_keywords():
    kernel = inspect.signature(splash_attention).parameters
    reference = inspect.signature(attention_reference).parameters
    public = [name for name in kernel if not name.startswith("_")]
    assert [name for name in reference] == public
    assert all(reference[n].kind == kernel[n].kind and reference[n].default == kernel[n].default
               for n in public if n != "block_sizes")
    assert reference["block_sizes"].default is None  # ignored; the kernel's default is BlockSizes()


def test_attention_reference_matches_float64():
    rng = np.random.default_rng([SEED, 5])
    q, k, v = _inputs(rng, 3, 100, 100, 64, f32)
    for window in (None, 7):
        out = attention_reference(q, k, v, block_sizes=BlockSizes(8, 8, 8), window_size=window, k_smooth=True,
                                  pv_f32=True, interpret=True)
        assert out.dtype == jnp.float32
        assert rel_err(out, _reference64(q, k, v, window_size=window)) <= KERNEL_F32_RTOL


def test_lowers_to_mosaic():
    """The compiled path lowers to a Mosaic TPU custom call even here (no TPU needed to lower)."""
    for dtype, d, kwargs in [(bf16, 128, {}), (bf16, 64, dict(window_size=300, k_smooth=True)),
                             (f32, 128, dict(window_size=300, pv_f32=True)), (bf16, 128, dict(pv_f32=True))]:
        x = jax.ShapeDtypeStruct((2, 1000, d), dtype)
        fn = lambda q, k, v: splash_attention(q, k, v, block_sizes=BlockSizes(256, 512, 256), **kwargs)  # noqa: E731
        text = jax.jit(fn).trace(x, x, x).lower(lowering_platforms=("tpu",)).as_text()
        assert "tpu_custom_call" in text
        # Mosaic is asked for exactly the VMEM the kernel entry checks against.
        assert re.findall(r"scoped_memory_configs.*?size\\22: (\d+)", text) == [str(VMEM_LIMIT_BYTES)]


@pytest.mark.parametrize("kwargs,fragments", [
    (dict(bq=0), ["bq", "0"]),
    (dict(bkv=-128), ["bkv", "-128"]),
    (dict(bq=100), ["bq=100", "multiple of 8"]),
    (dict(bkv=256, bkv_compute=96), ["bkv=256", "bkv_compute=96"]),
    (dict(bkv_compute=2048), ["bkv=1024", "bkv_compute=2048"]),
])
def test_block_sizes_rejects(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        BlockSizes(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_bad_inputs():
    ok = jnp.zeros((2, 16, 64), f32)
    cases = [
        ((ok, jnp.zeros((2, 24, 64), f32), jnp.zeros((2, 24, 64), f32)), dict(window_size=4), ["L=16", "S=24"]),
        ((ok[0], ok, ok), {}, ["ndim 3", "(16, 64)"]),
        ((ok.astype(jnp.float16), ok, ok), {}, ["float32 or bfloat16", "float16"]),
        ((ok, ok.astype(bf16), ok), {}, ["float32", "bfloat16"]),
        ((ok, jnp.zeros((3, 16, 64), f32), jnp.zeros((3, 16, 64), f32)), {}, ["[3, L, 64]", "(2, 16, 64)"]),
        ((ok, ok, jnp.zeros((2, 16, 32), f32)), {}, ["(2, 16, 64)", "(2, 16, 32)"]),
        ((ok, ok, ok), dict(window_size=-1), ["-1"]),
        ((ok, ok, ok), dict(block_sizes=BlockSizes(64, 128, 64)), ["bkv_compute a multiple of 128", "found 64"]),  # compiled
    ]
    for args, kwargs, fragments in cases:
        with pytest.raises(ValueError) as info:
            splash_attention(*args, **kwargs)
        for fragment in fragments:
            assert fragment in str(info.value), (str(info.value), fragment)
    with pytest.raises(ValueError, match="L=16, S=24"):
        attention_reference(*cases[0][0], window_size=4)


def test_vmem_budget():
    for dtype in (f32, bf16):
        for d in (64, 128):
            assert vmem_bytes(BlockSizes(), d, dtype) <= VMEM_LIMIT_BYTES // 2
    # bf16, D=128 defaults: q/o 2 x 128 KiB, k/v 2 x 256 KiB, double-buffered; m, l 2 x 256 KiB; acc 256 KiB;
    # logits and probabilities 2 x 1 MiB.
    assert vmem_bytes(BlockSizes(), 128, bf16) == 2 * (2 * 128 + 2 * 256) * 1024 + 3 * 256 * 1024 + 2 * 2**20
    assert vmem_bytes(BlockSizes(), 64, bf16) == vmem_bytes(BlockSizes(), 128, bf16)  # lanes pad to 128
    assert vmem_bytes(BlockSizes(), 128, f32) == 5.75 * 2**20  # float32 blocks are twice as large: 3 MiB


def test_block_sizes_over_the_vmem_limit_are_refused():
    blocks = BlockSizes(2048, 4096, 512)
    need = vmem_bytes(blocks, 128, bf16)  # 17.0 MiB
    assert need > VMEM_LIMIT_BYTES
    x = jax.ShapeDtypeStruct((1, 8192, 128), bf16)
    with pytest.raises(ValueError) as info:  # raised at trace time, nothing runs
        jax.eval_shape(functools.partial(splash_attention, block_sizes=blocks, interpret=True), x, x, x)
    for fragment in (f"need {need} bytes", f"VMEM limit of {VMEM_LIMIT_BYTES} bytes", "bq=2048", "bkv=4096"):
        assert fragment in str(info.value), (str(info.value), fragment)
    # The same blocks on a short sequence shrink to it and fit.
    y = jax.ShapeDtypeStruct((1, 300, 128), bf16)
    assert jax.eval_shape(functools.partial(splash_attention, block_sizes=blocks), y, y, y).shape == y.shape


def test_attended_pairs():
    for n, w in [(1, 0), (7, 0), (7, 2), (7, 6), (7, 100), (300, 50)]:
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        assert attended_pairs(n, n, w) == int((np.abs(i - j) <= w).sum())
    assert attended_pairs(200, 77) == 200 * 77
