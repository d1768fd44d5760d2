"""TPU slices as users name them (v5e-8, v6e-16, v5p-8, ...) -> abstract TPU devices to compile for, on any host.

With libtpu installed, `jax.experimental.topologies.get_topology_desc` describes a slice without one being
attached: its devices can make a `Mesh`, and `jit(f).lower(ShapeDtypeStructs sharded on that mesh).compile()`
runs the real TPU compiler (XLA:TPU and Mosaic). Nothing runs; the compiled program says what it would hold,
compute and move between chips (tpu_wan.run.aot).

Slice names count TensorCores: v4 and v5p chips have two (a "megacore" JAX device each), so v4-8 and v5p-8 are
4 chips; v5e and v6e chips have one. HBM per chip is the physical figure; what one program may use of it is the
TPU compiler's own limit, the "available HBM" it names when it refuses a larger program (RESOURCE_EXHAUSTED),
read off libtpu 0.0.42.1 for each generation and checked against it by tests/test_topology.py.
"""

from __future__ import annotations

import dataclasses
import os
import re

from tpu_wan.core.errors import TopologyError

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
    prefix: str  # the generation in libtpu's topology names ("v5" is v5p)
    device_kind: str  # what jax's devices report
    cores_per_chip: int
    hbm_bytes: int
    usable_hbm_bytes: int  # the TPU compiler's limit for one program on one chip
    chips_per_host: int  # chips one TPU VM host drives in a multi-host slice
    topologies: dict[int, str]  # chips -> the chip grid


_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}

GENERATIONS = {  # v5p: 96 GiB physical, published as 95 GiB (what the runtime leaves for programs)
    "v4": Generation("v4", "TPU v4", 2, 32 * GIB, int(30.75 * GIB), 4, _GRID_3D),
    "v5e": Generation("v5e", "TPU v5 lite", 1, 16 * GIB, int(15.75 * GIB), 4, _GRID_2D),
    "v5p": Generation("v5", "TPU v5", 2, 96 * GIB, int(95.74 * GIB), 4, _GRID_3D),
    "v6e": Generation("v6e", "TPU v6 lite", 1, 32 * GIB, int(31.25 * GIB), 4, _GRID_2D),
}
# A single v5e or v6e TPU VM drives up to 8 chips (v5litepod-8, v6e-8); larger slices have 4 chips per host.
SINGLE_HOST_CHIPS = 8


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """A TPU slice to compile for: `name` as users write it (v6e-8), and what the compiler needs to know of it."""

    name: str
    generation: Generation
    chips: int

    @property
    def topology(self) -> str:  # libtpu's name, e.g. "v6e:2x4"
        return f"{self.generation.prefix}:{self.generation.topologies[self.chips]}"

    @property
    def chips_per_host(self) -> int:
        single = self.generation.cores_per_chip == 1 and self.chips <= SINGLE_HOST_CHIPS
        return self.chips if single else min(self.chips, self.generation.chips_per_host)

    @property
    def hosts(self) -> int:
        return self.chips // self.chips_per_host

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_bytes

    @property
    def usable_hbm_bytes(self) -> int:
        return self.generation.usable_hbm_bytes

    def host_bounds(self) -> tuple[int, int, int]:
        if self.chips_per_host == 1:
            return (1, 1, 1)
        if self.chips_per_host == 8:
            return (2, 4, 1)
        return (2, 2, 1)

    def devices(self) -> list:
        """The slice's abstract devices, one per chip (megacore: both cores of a chip are one device)."""
        try:
            import libtpu  # noqa: F401
        except ImportError:
            raise TopologyError(f"--topology {self.name}: expected libtpu installed to compile for TPUs "
                                "(pip install 'tpu-wan[test]' or 'jax[tpu]'), found none") from None
        # libtpu reads these when it loads; without them it looks for a TPU on this host and logs errors.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", self.name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip is claimed: compiles may run side by side
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=self.topology,
            chip_config_name="megacore" if self.generation.cores_per_chip == 2 else "default",
            chips_per_host_bounds=self.host_bounds(), num_slices=1,
        )
        return list(desc.devices)

    def describe(self) -> dict:
        """The metrics.json "target" entry."""
        return {"topology": self.name, "device_kind": self.generation.device_kind, "devices": self.chips,
                "hosts": self.hosts, "hbm_bytes_per_device": self.hbm_bytes,
                "usable_hbm_bytes_per_device": self.usable_hbm_bytes}


def known_names() -> list[str]:
    names = []
    for key, gen in GENERATIONS.items():
        names += [f"{key}-{chips * gen.cores_per_chip}" for chips in gen.topologies]
    return names


def parse_target(name: str) -> TpuTarget:
    """'v6e-8' -> TpuTarget; v4 and v5p names count cores (v5p-8 = 4 chips), v5e and v6e names count chips."""
    match = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name.strip().lower())
    gen = GENERATIONS[match.group(1)] if match else None
    cores = int(match.group(2)) if match else 0
    chips = cores // gen.cores_per_chip if gen else 0
    if gen is None or cores % gen.cores_per_chip or chips not in gen.topologies:
        raise TopologyError(f"--topology: expected a TPU slice such as v5e-8, v6e-16 or v5p-8 "
                            f"(one of {', '.join(known_names())}), found {name!r}")
    return TpuTarget(name=f"{match.group(1)}-{cores}", generation=gen, chips=chips)
