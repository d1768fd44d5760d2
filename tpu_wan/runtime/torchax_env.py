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
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import torch

from tpu_wan.runtime import stacking


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
            sub._constraints = (*getattr(sub, "_constraints", ()), fn)  # for a scanned layer's loop carry


# A ModuleList's loop as one JAX function: (hidden, run) -> hidden, where run(h, start, stop) runs members
# [start:stop] on the jax array h (their other arguments as the loop passes them) and returns a jax array.
StackFn = Callable[[Any, Callable[..., Any]], Any]


# The stacked weights of the layer lists being traced: ModuleList path -> {member's own weight name: [L, ...]}.
_layer_weights: contextvars.ContextVar[dict[str, dict[str, Any]]] = contextvars.ContextVar("layers", default={})


def _run_stack(blocks: torch.nn.ModuleList, stack_fn: StackFn, path: str, hidden, *args, **kwargs):
    interop = _torchax().interop
    members = list(blocks._modules.values())
    stacked = _layer_weights.get().get(path)

    def run(h, start: int = 0, stop: int | None = None):
        t = interop.torch_view(h)
        for block in members[start:stop]:  # each through its own __call__: its hooks (constraints) apply
            t = block(t, *args, **kwargs)
        return interop.jax_view(t)

    def scan(h, start: int = 0, stop: int | None = None):
        # One loop over layer indices runs member 0's code with layer i's weights: the compiler sees one block. Each
        # trip reads its row of the stacked weights in place (a dynamic index into a loop input), so a sub-range
        # (start:stop) copies no weight. Member 0's __call__ runs, so its hooks (constraints) apply in the body.
        env, template = _env(), members[0]

        def layer(i, h):
            weights = {name: jax.lax.dynamic_index_in_dim(w, i, keepdims=False) for name, w in stacked.items()}
            with torch.nn.utils.stateless._reparametrize_module(template, env.j2t_iso(weights)):
                return interop.jax_view(template(interop.torch_view(h), *args, **kwargs))

        start, stop, _ = slice(start, stop).indices(len(members))
        if stop <= start:
            return h
        # The loop carries the hidden state in the layout the layers' inputs and outputs are pinned to, pinned on
        # both sides of the loop too. Left free, XLA gives the carry the layout the layers after the loop want
        # (Megatron: split on E for the row-parallel proj_out), and then gathers it at every trip's input
        # constraint and scatters it at every trip's end: 9.4 GiB more per 14B step at 480p on v6e-8.
        constraints = getattr(template, "_constraints", ())
        for constrain in constraints:
            h = constrain(h)
        h = jax.lax.fori_loop(start, stop, layer, h)
        for constrain in constraints:
            h = constrain(h)
        return h

    return interop.torch_view(stack_fn(interop.jax_view(hidden), run if stacked is None else scan))


def _run_all(hidden, run):
    return run(hidden)


def _replace_loops(module: torch.nn.Module, stacks: Mapping[str, StackFn], scan: Sequence[str]) -> None:
    """Makes `for block in module.<name>: hidden = block(hidden, *args)` call stacks[name] once instead (the
    ModuleList yields one callable); its members, their names and weights are unchanged. A list in `scan` without
    a StackFn runs all its members."""
    for name in {**dict.fromkeys(scan), **stacks}:
        blocks = module.get_submodule(name)
        if not isinstance(blocks, torch.nn.ModuleList):
            raise ValueError(f"stacks: expected {name!r} to be a ModuleList, found {type(blocks).__name__}")
        run = functools.partial(_run_stack, blocks, stacks.get(name, _run_all), name)
        iterate = lambda self, run=run: iter((run,))  # noqa: E731
        blocks.__class__ = type(f"Stacked{type(blocks).__name__}", (type(blocks),), {"__iter__": iterate})


def _check_scannable(module: torch.nn.Module, scan: Sequence[str], aliases: Mapping[str, str]) -> None:
    """A list runs as one loop only if its members are one structure: the same weight names and shapes."""
    tied = [alias for pair in aliases.items() for alias in pair if stacking.family(alias, scan)]
    if tied:
        raise ValueError(f"scan: expected the layers' weights untied, found {tied[0]} tied")
    for path in scan:
        members = list(module.get_submodule(path))
        if not members:
            raise ValueError(f"scan: expected layers in {path!r}, found none")
        first = _structure(members[0])
        for i, member in enumerate(members[1:], 1):
            if (found := _structure(member)) != first:
                diff = sorted(set(found) ^ set(first))[:2]
                raise ValueError(f"scan: expected every layer of {path!r} like layer 0, found layer {i} differing in "
                                 f"{diff}")


def _structure(module: torch.nn.Module) -> list[tuple[str, ...]]:
    """The module's class and every weight's name, shape and dtype, as text."""
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return [("class", type(module).__name__)] + [(n, str(tuple(t.shape)), str(t.dtype)) for n, t in tensors]


def functionalize(
    module: torch.nn.Module, attention_fn: AttentionFn | None = None, method: str = "forward",
    constraints: Mapping[str, Constraint] | None = None, stacks: Mapping[str, StackFn] | None = None,
    scan: Sequence[str] = (),
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
    `scan`: ModuleLists whose loop runs as one loop over layers (`jax.lax.fori_loop`, one block compiled); their
    members' weights are then returned and taken stacked, one [L, ...] array per family (tpu_wan.runtime.stacking).
    """
    weights, aliases = module_weights(module)
    _check_scannable(module, scan, aliases)
    weights = stacking.stack_host(weights, scan)
    module = copy.deepcopy(module)
    env = _env()
    _constrain_submodules(module, constraints or {})
    _replace_loops(module, stacks or {}, scan)
    names = set(weights) | set(stacking.stack_shapes(
        {name: (shape, None) for name, (shape, _) in meta_parameters(module).items()}, scan))

    def fn(weights_in: dict, *args, **kwargs):
        missing = names - set(weights_in)
        if missing:
            raise KeyError(f"weights missing for {sorted(missing)[:5]}")
        plain, layers = stacking.by_list(weights_in, scan)
        torch_weights, args, kwargs = env.j2t_iso((plain, args, kwargs))
        torch_weights.update({alias: torch_weights[name] for alias, name in aliases.items()})
        token = _active_attention.set(attention_fn)
        layers_token = _layer_weights.set(layers)
        try:
            with env, torch.nn.utils.stateless._reparametrize_module(module, torch_weights), warnings.catch_warnings():
                # torch code asks for int64 indices (positions, RoPE grids); jax's default int32 holds them.
                warnings.filterwarnings("ignore", message="Explicitly requested dtype int64")
                out = getattr(module, method)(*args, **kwargs)
        finally:
            _active_attention.reset(token)
            _layer_weights.reset(layers_token)
        return env.t2j_iso(out)

    return weights, fn
