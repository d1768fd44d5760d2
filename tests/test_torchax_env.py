"""The torchax bridge: imports on torch 2.11 to 2.13, runs torch modules as pure JAX, routes attention to us."""

import jax
import numpy as np
import pytest
import torch
from conftest import MODULE_RTOL, rel_err

from tpu_wan.runtime import torchax_env


class _TinyAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 24)
        self.register_buffer("offset", torch.linspace(-1, 1, 8), persistent=False)  # missed by state_dict()

    def forward(self, x):  # [B L 8]
        q, k, v = self.proj(x + self.offset).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [B N L D]


def test_torchax_imports_with_the_shim():
    torchax = torchax_env._torchax()
    assert torchax.__version__ == "0.0.13"


def test_the_shim_patches_only_where_torch_lost_the_named_tensor_overloads():
    # torch 2.13 removed them (the shim is needed); torch 2.11 and 2.12 still have them (nothing is patched)
    removed = tuple(int(n) for n in torch.__version__.split(".")[:2]) >= (2, 13)
    assert torchax_env._named_tensor_overloads_removed() == removed
    original = torch._ops.OpOverloadPacket.__getattr__
    with torchax_env._tolerate_missing_overloads():
        patched = torch._ops.OpOverloadPacket.__getattr__ is not original
        if removed:  # a missing overload resolves to an inert placeholder while torchax imports
            assert "missing aten overload aten::prod.dim_Dimname" in repr(torch.ops.aten.prod.dim_Dimname)
    assert patched == removed
    assert torch._ops.OpOverloadPacket.__getattr__ is original


def test_functionalized_module_matches_torch():
    torch.manual_seed(0)
    module = _TinyAttention().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        ref = module(x).numpy()
    calls = []

    def attention(q, k, v, *, scale=None):
        calls.append(q.shape)
        return jax.nn.dot_product_attention(*(t.transpose(0, 2, 1, 3) for t in (q, k, v))).transpose(0, 2, 1, 3)

    weights, fn = torchax_env.functionalize(module, attention)
    assert set(weights) == {"proj.weight", "proj.bias", "offset"}
    out = jax.jit(fn)(weights, x.numpy())
    print(f"rel err {rel_err(out, ref):.2e}")
    assert rel_err(out, ref) <= MODULE_RTOL
    assert calls == [(2, 2, 5, 4)]  # traced once, through our attention


def test_default_attention_is_torchax_lowering():
    torch.manual_seed(1)
    module = _TinyAttention().eval()
    x = torch.randn(1, 3, 8)
    weights, fn = torchax_env.functionalize(module)
    with torch.no_grad():
        assert rel_err(jax.jit(fn)(weights, x.numpy()), module(x).numpy()) <= MODULE_RTOL


def test_tied_weights_appear_once():
    lin = torch.nn.Linear(4, 4)
    module = torch.nn.Sequential(lin, torch.nn.ReLU(), lin)
    weights, aliases = torchax_env.module_weights(module)
    assert set(weights) == {"0.weight", "0.bias"} and aliases == {"2.weight": "0.weight", "2.bias": "0.bias"}
    _, fn = torchax_env.functionalize(module)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert rel_err(jax.jit(fn)(weights, x.numpy()), module(x).numpy()) <= MODULE_RTOL


class _RotateInto(torch.nn.Module):
    """diffusers' Wan RoPE pattern: float32 rotations written into strided slices of a bfloat16 tensor."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("cos", torch.linspace(0, 1, n), persistent=False)  # float32

    def forward(self, x):  # [L 2n] bf16
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * self.cos
        out[..., 1::2] = x[..., 1::2] * self.cos
        return out


def test_assignment_casts_to_the_destination_dtype_as_torch_does():
    # torch casts the assigned value to out's dtype; handing jax's scatter a float32 value for a bf16 array
    # gives the same numbers but a FutureWarning that a future jax makes an error (pyproject turns it into one).
    module = _RotateInto(4)
    x = torch.randn(3, 8).to(torch.bfloat16)
    weights, fn = torchax_env.functionalize(module)
    with torch.no_grad():
        ref = module(x)
    out = jax.jit(fn)(weights, torchax_env._to_numpy(x))
    assert out.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), ref.float().numpy())


class _Block(torch.nn.Linear):
    def forward(self, x, scale):
        return super().forward(x) * scale


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block(4, 4) for _ in range(3))

    def forward(self, x, scale):
        for block in self.blocks:  # as diffusers' transformers loop: hidden = block(hidden, *other arguments)
            x = block(x, scale)
        return x


def test_a_stack_replaces_the_loop_over_a_module_list():
    # functionalize(stacks=...): the module's loop over `blocks` calls our function once, which runs any slice of
    # the blocks (with the loop's other arguments) on jax arrays; names and weights stay as they were.
    torch.manual_seed(0)
    module = _Stack().eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        ref = module(x, 0.5).numpy()
    slices = []

    def stack(hidden, run):  # blocks 0, then 1-2 inside a lax.cond, as tpu_wan.sampling.step_cache runs them
        slices.append(hidden.shape)
        head = run(hidden, 0, 1)
        return jax.lax.cond(True, lambda h: run(h, 1, None), lambda h: h, head)

    weights, fn = torchax_env.functionalize(module, stacks={"blocks": stack})
    plain_weights, plain = torchax_env.functionalize(module)
    assert set(weights) == set(plain_weights) == {f"blocks.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    out = jax.jit(fn)(weights, x.numpy(), 0.5)
    assert rel_err(out, ref) <= MODULE_RTOL and slices == [(2, 4)]
    np.testing.assert_array_equal(out, jax.jit(plain)(weights, x.numpy(), 0.5))
    assert len(list(module.blocks)) == 3  # the module given is left as it was


def test_a_scanned_stack_runs_one_block_over_stacked_weights():
    # functionalize(scan=...): the loop over `blocks` is one loop over layer indices running block 0's code with
    # each layer's row of the stacked weights; any slice of it runs (step_cache's head and tail), with block 0's
    # hooks (constraints) applied in the loop body, and the numbers of the unrolled loop.
    torch.manual_seed(0)
    module = _Stack().eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        ref = module(x, 0.5).numpy()
    constrained = []

    def constraint(h):
        constrained.append(h.shape)
        return h

    def stack(hidden, run):
        head = run(hidden, 0, 1)
        return jax.lax.cond(True, lambda h: run(h, 1, None), lambda h: h, head)

    weights, fn = torchax_env.functionalize(module, constraints={r"blocks\.\d+": constraint}, stacks={"blocks": stack},
                                            scan=("blocks",))
    plain_weights, plain = torchax_env.functionalize(module)
    assert {n: w.shape for n, w in weights.items()} == {"blocks.*.weight": (3, 4, 4), "blocks.*.bias": (3, 4)}
    np.testing.assert_array_equal(weights["blocks.*.weight"][2], plain_weights["blocks.2.weight"])
    lowered = jax.jit(fn).lower(weights, x.numpy(), 0.5)
    out = lowered.compile()(weights, x.numpy(), 0.5)
    assert rel_err(out, ref) <= MODULE_RTOL
    np.testing.assert_allclose(out, jax.jit(plain)(plain_weights, x.numpy(), 0.5), rtol=MODULE_RTOL)
    assert lowered.as_text().count("stablehlo.dot_general") == 2  # one block per loop (head, tail), not three
    # each of the two loops: its carry on entry and exit, and block 0's input and output in its body (traced once)
    assert constrained == [(2, 4)] * 8


def test_a_scan_refuses_layers_of_different_structure():
    module = _Stack()
    module.blocks[2] = _Block(4, 5)
    with pytest.raises(ValueError, match=r"expected every layer of 'blocks' like layer 0, found layer 2"):
        torchax_env.functionalize(module, scan=("blocks",))
