"""What a compiled program says of itself: its memory and cost analysis (`program_numbers`), the TPU compiler's
refusal of a program that does not fit the chip's HBM (`out_of_memory`), and what its optimized HLO module moves
between devices and which custom calls it makes, read from its text (`compiled.as_text()`), per device and per
call of the program.

An instruction inside a while loop counts once per trip when XLA knows the trip count (`known_trip_count` in
its backend config, as for a `lax.scan`), else once. Two counts of collective bytes, both per device:
- `bytes`: the larger of what the op reads and what it writes (all-gather: the gathered result; reduce-scatter:
  the full input; all-reduce, all-to-all, collective-permute: their operand).
- `traffic_bytes`: what one device sends in it over a group of n devices, as ring algorithms move data:
  all-reduce 2 (n-1)/n of its operand (a reduce-scatter, then an all-gather), all-gather (n-1)/n of its result,
  reduce-scatter and all-to-all (n-1)/n of their operand, collective-permute its operand. This is the count that
  compares layouts: `bytes` counts an all-reduce once though it moves its operand 1.5 times over 4 devices, and
  counts the shard a device already holds in an all-gather's result.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "s4": 0.5, "u4": 0.5,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
    "c64": 8, "c128": 16,
}
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_CALLEES = re.compile(r"\b(?:body|condition|calls|to_apply)=%([\w.\-]+)|branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")
_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")
_CHAIN = re.compile(r'channel_id=(\d+).*?chain_id="(\d+)"')


def program_numbers(compiled) -> dict:
    """Per device, one call: XLA's memory analysis (bytes of arguments, outputs, aliased outputs, temporaries and
    generated code) and its cost analysis (flops; a loop body counted once)."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
            "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
            "generated_code_bytes": mem.generated_code_size_in_bytes, "flops": float(cost.get("flops", 0.0))}


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
    """The TPU compiler's refusal of a program larger than a chip's HBM: what it needs and what there is, in
    bytes, as precise as its message (two decimals of the unit)."""

    required_bytes: int
    available_bytes: int
    message: str


# XLA:TPU's two wordings (libtpu): the program's total, or the space it ran out of while assigning buffers.
_OOM_TOTAL = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM "
                        r"\(([\d.]+)([KMGT]?)i?B?\)")
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def out_of_memory(err: BaseException) -> OutOfMemory | None:
    """The compiler's "does not fit the HBM" refusal in `err` (RESOURCE_EXHAUSTED), or None for any other error."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    match = _OOM_TOTAL.search(text) or _OOM_USED.search(text)
    if match is None:
        return None
    need, need_unit, have, have_unit = match.groups()
    first = text.strip().splitlines()[0]
    return OutOfMemory(int(float(need) * _UNITS[need_unit]), int(float(have) * _UNITS[have_unit]), first)


def array_bytes(type_text: str, skip_scalars: bool = False) -> int:
    """Bytes of every array in an HLO type (`bf16[8,128]{1,0}` or a tuple of them); layouts are ignored."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype not in DTYPE_BYTES or (skip_scalars and not dims):
            continue
        total += math.prod(int(d) for d in dims.split(",") if d) * DTYPE_BYTES[dtype]
    return int(total)


def _operands(args_text: str) -> list[str]:
    """The %names an instruction's argument list starts with (up to its closing parenthesis)."""
    depth, end = 1, len(args_text)
    for i, ch in enumerate(args_text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", args_text[:end])


def group_size(args_text: str, num_devices: int) -> int:
    """How many devices take part in each group of a collective, from its replica_groups in any of XLA's three
    spellings (explicit lists, iota `[groups,size]<=[...]`, named mesh axes); empty groups: every device."""
    if m := _MESH_GROUPS.search(args_text):
        sizes = {name: int(size) for name, size in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
        return math.prod(sizes[name] for name in re.findall(r"'(\w+)'", m.group(2)))
    if m := _LIST_GROUPS.search(args_text):
        return len([d for d in m.group(1).split(",") if d])
    if m := _IOTA_GROUPS.search(args_text):
        return int(m.group(1))
    return num_devices


def traffic(kind: str, read: int, written: int, n: int) -> float:
    """Bytes one device sends in collective `kind` over groups of n devices (see the module docstring)."""
    if kind == "collective-permute":
        return read
    if n <= 1:
        return 0.0
    share = (n - 1) / n
    return {"all-reduce": 2 * share * read, "all-gather": share * written}.get(kind, share * read)


def summarize(hlo_text: str) -> dict:
    """{"collectives": {kind: {"count", "bytes", "traffic_bytes"}}, "custom_calls": {target: count}} of one
    call of the module."""
    num_devices = int(m.group(1)) if (m := _PARTITIONS.search(hlo_text)) else 1
    computations: list[tuple[str, list[tuple[str, str, str, str]]]] = []
    types: dict[str, str] = {}
    entry = None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            computations.append((header.group(1), []))
            if line.startswith("ENTRY"):
                entry = header.group(1)
            continue
        inst = _INSTRUCTION.match(line)
        if inst and computations:
            name, type_text, op, rest = inst.groups()
            types[name] = type_text
            computations[-1][1].append((name, type_text, op, rest))
    times = defaultdict(int)
    times[entry or (computations[-1][0] if computations else "")] = 1
    # Callers come after their callees in the text, so walking it backwards settles each computation's count first.
    for comp, instructions in reversed(computations):
        for _, _, op, rest in instructions:
            trips = int(m.group(1)) if op == "while" and (m := _TRIP_COUNT.search(rest)) else 1
            for called, branches in _CALLEES.findall(rest):
                for callee in [called] if called else re.findall(r"%([\w.\-]+)", branches):
                    times[callee] += times[comp] * trips
    collectives = {kind: {"count": 0, "bytes": 0, "traffic_bytes": 0} for kind in COLLECTIVES}
    custom_calls: dict[str, int] = defaultdict(int)
    chained = set()
    for comp, instructions in computations:
        n = times[comp]
        if not n:
            continue
        for _, type_text, op, rest in instructions:
            kind = op.removesuffix("-start")
            if kind in COLLECTIVES and (chain := _CHAIN.search(rest)):
                # XLA:TPU's async collective fusion (v5e) writes one collective into each fusion of its chain (the
                # start and its continuations), all with the same channel and chain ids: it runs once.
                if (kind, *chain.groups()) in chained:
                    continue
                chained.add((kind, *chain.groups()))
            if kind in COLLECTIVES:
                read = sum(array_bytes(types.get(o, "")) for o in _operands(rest))
                written = array_bytes(type_text, skip_scalars=True)
                if op.endswith("-start") and kind != "all-reduce":  # its result holds the operands, then the outputs
                    written -= read
                collectives[kind]["count"] += n
                collectives[kind]["bytes"] += n * max(read, written)
                moved = traffic(kind, read, written, group_size(rest, num_devices))
                collectives[kind]["traffic_bytes"] += int(round(n * moved))
            elif op == "custom-call" and (target := re.search(r'custom_call_target="([^"]+)"', rest)):
                custom_calls[target.group(1)] += n
    return {"collectives": collectives, "custom_calls": dict(custom_calls)}
