"""Per-layer weights as one [L, ...] array per family, for a block loop that runs as one loop over layers
(torchax_env.functionalize(scan=...)): the compiler sees one block, so compile time stays flat in depth.

Of the layer list "blocks", the weight "blocks.3.attn1.to_q.weight" is row 3 of the family
"blocks.*.attn1.to_q.weight" (mesh.LAYER marks the layer axis). Weights are read per layer, under their checkpoint
names (LoRA fusion, fine-tune overrides and shape checks stay per layer: tpu_wan.runtime.loading), and stacked once
where they are placed, each family in the sharding of its layers' rule with the layer axis unsplit (mesh.spec_for).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from tpu_wan.runtime import mesh as mesh_lib

LAYER = mesh_lib.LAYER


def family(name: str, lists: Sequence[str]) -> tuple[str, int] | None:
    """(family, layer index) of a weight of a member of one of the layer `lists` (ModuleList paths), else None."""
    for path in lists:
        if name.startswith(f"{path}."):
            index, _, rest = name[len(path) + 1:].partition(".")
            if index.isdigit() and rest:
                return f"{path}.{LAYER}.{rest}", int(index)
    return None


def by_list(weights: Mapping, lists: Sequence[str]) -> tuple[dict, dict[str, dict]]:
    """(the weights outside the stacked families of `lists`, ModuleList path -> {the members' own weight name: its
    family}): "blocks.*.attn1.to_q.weight" is "attn1.to_q.weight" of "blocks"."""
    plain, stacked = {}, {}
    for name, value in weights.items():
        path, _, own = name.partition(f".{LAYER}.")
        if own and path in lists:
            stacked.setdefault(path, {})[own] = value
        else:
            plain[name] = value
    return plain, stacked


def families(names: Iterable[str], lists: Sequence[str]) -> dict[str, list[str]]:
    """family -> its layers' weight names in layer order, for the names of members of `lists`; refuses a family
    whose layers are not 0..L-1."""
    found: dict[str, dict[int, str]] = {}
    for name in names:
        if (member := family(name, lists)) is not None:
            found.setdefault(member[0], {})[member[1]] = name
    for stacked, layers in found.items():
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"{stacked}: expected layers 0..{len(layers) - 1}, found {sorted(layers)}")
    return {stacked: [layers[i] for i in range(len(layers))] for stacked, layers in found.items()}


def _restack(weights: Mapping, lists: Sequence[str], combine: Callable[[str, list], object]) -> dict:
    """`weights` with each family's layers replaced by combine(family, their values in layer order)."""
    grouped = families(weights, lists)
    members = {name for names in grouped.values() for name in names}
    out = {name: value for name, value in weights.items() if name not in members}
    for stacked, names in grouped.items():
        out[stacked] = combine(stacked, [weights[name] for name in names])
    return out


def stack_shapes(shapes: Mapping[str, tuple[Sequence[int], np.dtype]], lists: Sequence[str]) -> dict:
    """name -> (shape, dtype) with each family as one [L, ...] entry (abstract weights: nothing allocated)."""
    return _restack(shapes, lists, lambda _, layers: ((len(layers), *layers[0][0]), layers[0][1]))


def stack_host(weights: Mapping[str, np.ndarray], lists: Sequence[str]) -> dict[str, np.ndarray]:
    """Host (numpy) weights with each family stacked [L, ...]."""
    return _restack(weights, lists, lambda _, layers: np.stack(layers))


@functools.lru_cache(maxsize=None)
def _stacker(sharding: NamedSharding):
    return jax.jit(lambda *layers: jnp.stack(layers), out_shardings=sharding)


def stack_placed(weights: dict[str, jax.Array], lists: Sequence[str], rules: Sequence, mesh) -> dict[str, jax.Array]:
    """Weights on the mesh with each family stacked on the devices into its own sharding (each device stacks the
    slices it holds: no data moves between devices). A family's layer arrays are deleted once it is stacked, so
    device memory peaks at the weights plus one family. `weights` is consumed."""
    def combine(stacked: str, layers: list) -> jax.Array:
        spec, _ = mesh_lib.spec_for(stacked, rules)
        mesh_lib.check_divisible(stacked, (len(layers), *layers[0].shape), spec, mesh)
        out = _stacker(NamedSharding(mesh, spec))(*layers)
        out.block_until_ready()
        for layer in layers:
            layer.delete()
        return out

    return _restack(weights, lists, combine)


def lookup(weights: Mapping, name: str, lists: Sequence[str]) -> tuple[object, int | None]:
    """(the entry of `weights` holding the weight a checkpoint names `name`, its row there: None if not stacked)."""
    member = family(name, lists)
    return (weights[name], None) if member is None else (weights[member[0]], member[1])
