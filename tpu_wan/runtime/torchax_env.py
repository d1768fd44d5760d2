"""The one bridge to torchax: runs diffusers / transformers torch modules as pure JAX functions.

Everything else in tpu_wan sees plain JAX: `functionalize(module)` returns the module's weights as a dict of
numpy arrays and a function `(weights, *args) -> outputs` over jax arrays that can be jitted, sharded and
differentiated like any JAX function. scaled_dot_product_attention inside the module is routed to an
attention function of ours (tpu_wan.runtime.attention), so torch model code runs on our kernels.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import re
import warnings
from typing import Any, Callable, Mapping

import numpy as np
import torch


class _MissingOverload:
    """Stands in for an aten overload that torch no longer has; never called."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<missing aten overload {self.name}>"

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"aten overload {self.name} does not exist in torch {torch.__version__}")


def _named_tensor_overloads_removed() -> bool:
    """torch 2.13 removed the named-tensor (Dimname) overloads; torch 2.11 and 2.12 still have them."""
    return "dim_Dimname" not in torch.ops.aten.prod.overloads()


@contextlib.contextmanager
def _tolerate_missing_overloads():
    # torchax 0.0.13 registers lowerings for 22 named-tensor (Dimname) overloads that torch 2.13 removed
    # (e.g. aten::prod.dim_Dimname); looking them up raises AttributeError and aborts `import torchax`.
    # While torchax imports and builds its first environment, a missing overload resolves to an inert
    # placeholder instead. The registry keys it creates are never hit: torch cannot dispatch to an
    # overload it does not have. Where torch still has them, nothing is patched.
    if not _named_tensor_overloads_removed():
        yield
        return
    packet = torch._ops.OpOverloadPacket
    original = packet.__getattr__

    def lenient_getattr(self, key):
        try:
            return original(self, key)
        except AttributeError:
            if key.startswith("__"):
                raise
            return _MissingOverload(f"{self._qualified_op_name}.{key}")

    packet.__getattr__ = lenient_getattr
    try:
        yield
    finally:
        packet.__getattr__ = original


def _assign_in_destination_dtype(tensor_class) -> None:
    """torch casts the value of `out[index] = value` to out's dtype; torchax 0.0.13 hands both dtypes to jax's
    scatter, which casts the same way but warns that a future jax will refuse it (diffusers' Wan RoPE writes
    float32 rotations into a bf16 tensor). Casting first, as torch does, gives the same numbers without it."""
    assign = tensor_class.__setitem__

    def setitem(self, key, value):
        if isinstance(value, torch.Tensor) and value.dtype != self.dtype:
            value = value.to(self.dtype)
        assign(self, key, value)

    tensor_class.__setitem__ = setitem


@functools.cache
def _torchax():
    with _tolerate_missing_overloads():
        import torchax
        import torchax.interop
        import torchax.tensor

        torchax.default_env()
    _assign_in_destination_dtype(torchax.tensor.Tensor)
    return torchax


AttentionFn = Callable[..., Any]  # (q [B N L D], k [B N S D], v [B N S D], *, scale) -> [B N L D], on jax arrays

# The attention function of the module call being traced. torchax has one op table per process, so the
# scaled_dot_product_attention override is installed once and looks up the function here at trace time.
_active_attention: contextvars.ContextVar[AttentionFn | None] = contextvars.ContextVar("attention", default=None)


@functools.cache
def _env():
    torchax = _torchax()
    env = torchax.default_env()
    interop = torchax.interop
    from torchax.ops import jtorch

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        attention_fn = _active_attention.get()
        if attention_fn is None:  # torchax's own lowering, op for op what torch computes
            return jtorch._sdpa_reference(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if attn_mask is not None or dropout_p or is_causal or enable_gqa:
            raise NotImplementedError(
                "the attention override takes plain softmax attention only, found "
                f"attn_mask={attn_mask is not None} dropout_p={dropout_p} is_causal={is_causal}"
            )
        q, k, v = interop.jax_view((query, key, value))
        return interop.torch_view(attention_fn(q, k, v, scale=scale))

    env.override_op_definition(torch.nn.functional.scaled_dot_product_attention, sdpa)
    return env


def module_weights(module: torch.nn.Module) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(weights, aliases): every materialised parameter and buffer as numpy, non-persistent buffers included
    (RoPE tables, which state_dict() misses); parameters still on the meta device (to be loaded elsewhere, see
    `meta_parameters`) are left out. A tensor tied under several names (UMT5's shared / embed_tokens) appears
    once, and `aliases` maps each further name to the one kept."""
    tensors = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    weights, aliases, first = {}, {}, {}
    for name, t in tensors:
        if id(t) in first:  # the same tensor object under another name
            aliases[name] = first[id(t)]
            continue
        first[id(t)] = name
        if not t.is_meta:
            weights[name] = _to_numpy(t.detach())
    return weights, aliases


def meta_parameters(module: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of each (untied) parameter that has no storage yet."""
    return {name: (tuple(p.shape), p.dtype) for name, p in module.named_parameters() if p.is_meta}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


Constraint = Callable[[Any], Any]  # jax array -> the same values, e.g. pinned to a sharding


def _constrain_submodules(module: torch.nn.Module, constraints: Mapping[str, Constraint]) -> None:
    """Hooks that pass the first positional input and the output of every submodule whose name fully matches a
    pattern through its function (on the jax array under the torchax tensor)."""
    interop = _torchax().interop
    for pattern, fn in constraints.items():
        on_tensor = lambda t, fn=fn: interop.torch_view(fn(interop.jax_view(t)))  # noqa: E731
        matched = [m for name, m in module.named_modules() if re.fullmatch(pattern, name)]
        if not matched:
            raise ValueError(f"no submodule of {type(module).__name__} matches {pattern!r}")
        for sub in matched:
            sub.register_forward_pre_hook(lambda _, args, on=on_tensor: (on(args[0]), *args[1:]))
            sub.register_forward_hook(lambda _, args, out, on=on_tensor: on(out))


# A ModuleList's loop as one JAX function: (hidden, run) -> hidden, where run(h, start, stop) runs members
# [start:stop] on the jax array h (their other arguments as the loop passes them) and returns a jax array.
StackFn = Callable[[Any, Callable[..., Any]], Any]


def _run_stack(blocks: torch.nn.ModuleList, stack_fn: StackFn, hidden, *args, **kwargs):
    interop = _torchax().interop
    members = list(blocks._modules.values())

    def run(h, start: int = 0, stop: int | None = None):
        t = interop.torch_view(h)
        for block in members[start:stop]:  # each through its own __call__: its hooks (constraints) apply
            t = block(t, *args, **kwargs)
        return interop.jax_view(t)

    return interop.torch_view(stack_fn(interop.jax_view(hidden), run))


def _replace_loops(module: torch.nn.Module, stacks: Mapping[str, StackFn]) -> None:
    """Makes `for block in module.<name>: hidden = block(hidden, *args)` call stacks[name] once instead (the
    ModuleList yields one callable); its members, their names and weights are unchanged."""
    for name, stack_fn in stacks.items():
        blocks = module.get_submodule(name)
        if not isinstance(blocks, torch.nn.ModuleList):
            raise ValueError(f"stacks: expected {name!r} to be a ModuleList, found {type(blocks).__name__}")
        iterate = lambda self, fn=stack_fn: iter((functools.partial(_run_stack, self, fn),))  # noqa: E731
        blocks.__class__ = type(f"Stacked{type(blocks).__name__}", (type(blocks),), {"__iter__": iterate})


def functionalize(
    module: torch.nn.Module, attention_fn: AttentionFn | None = None, method: str = "forward",
    constraints: Mapping[str, Constraint] | None = None, stacks: Mapping[str, StackFn] | None = None,
) -> tuple[dict[str, np.ndarray], Callable]:
    """Returns (weights, fn): fn(weights, *args, **kwargs) runs `module.method` on jax arrays.

    The module is deep-copied first (moving a module into torchax mutates it), and its materialised weights are
    returned so the caller can place them on the mesh with its own shardings; parameters built on the meta
    device are not returned, fn expects them in `weights` too (see tpu_wan.runtime.loading). Weights tied under
    several names appear once. Call fn inside jax.jit: eager calls go op by op through torchax.
    `constraints`: submodule name pattern -> a function applied to that submodule's first input and its output
    (a tensor), e.g. a sharding constraint on every transformer block's hidden state.
    `stacks`: ModuleList name -> a StackFn that runs the module's loop over it as one JAX function (e.g. blocks
    skipped under `jax.lax.cond`: tpu_wan.sampling.step_cache).
    """
    weights, aliases = module_weights(module)
    module = copy.deepcopy(module)
    env = _env()
    _constrain_submodules(module, constraints or {})
    _replace_loops(module, stacks or {})
    names = set(weights) | set(meta_parameters(module))

    def fn(weights_in: dict, *args, **kwargs):
        missing = names - set(weights_in)
        if missing:
            raise KeyError(f"weights missing for {sorted(missing)[:5]}")
        torch_weights, args, kwargs = env.j2t_iso((weights_in, args, kwargs))
        torch_weights.update({alias: torch_weights[name] for alias, name in aliases.items()})
        token = _active_attention.set(attention_fn)
        try:
            with env, torch.nn.utils.stateless._reparametrize_module(module, torch_weights), warnings.catch_warnings():
                # torch code asks for int64 indices (positions, RoPE grids); jax's default int32 holds them.
                warnings.filterwarnings("ignore", message="Explicitly requested dtype int64")
                out = getattr(module, method)(*args, **kwargs)
        finally:
            _active_attention.reset(token)
        return env.t2j_iso(out)

    return weights, fn
