"""The torchax bridge: imports on torch 2.13, runs torch modules as pure JAX, routes attention to us."""

import jax
import numpy as np
import torch

from tpu_wan import torchax_env


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
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    assert calls == [(2, 2, 5, 4)]  # traced once, through our attention


def test_default_attention_is_torchax_lowering():
    torch.manual_seed(1)
    module = _TinyAttention().eval()
    x = torch.randn(1, 3, 8)
    weights, fn = torchax_env.functionalize(module)
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(weights, x.numpy())), module(x).numpy(), rtol=1e-5, atol=1e-6)


def test_tied_weights_appear_once():
    lin = torch.nn.Linear(4, 4)
    module = torch.nn.Sequential(lin, torch.nn.ReLU(), lin)
    weights, aliases = torchax_env.module_weights(module)
    assert set(weights) == {"0.weight", "0.bias"} and aliases == {"2.weight": "0.weight", "2.bias": "0.bias"}
    _, fn = torchax_env.functionalize(module)
    x = torch.randn(3, 4)
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(weights, x.numpy())), module(x).numpy(), rtol=1e-6)
