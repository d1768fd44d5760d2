"""What a compiled program says of itself: its memory and cost analysis (`program_numbers`), the TPU compiler's
refusal of a program that does not fit the chip's HBM (`out_of_memory`), and what its optimized HLO module moves
between devices and which custom calls it makes, read from its text (`compiled.as_text()`), per device and per
call of the program.

An instruction inside a while loop counts once per trip when its trip count is known: `known_trip_count` in the
loop's backend config, or else read from the loop itself as a `lax.scan` / `fori_loop` compiles (XLA:TPU writes no
`known_trip_count`): a condition `counter < N` (or <=, >, >=) against a constant, the counter's start a constant in
the loop's initial tuple and its step a constant added in the body. A loop of unknown trip count counts once.
XLA's cost analysis counts a loop body once whatever its trips: `program_numbers` adds the matmul, convolution and
kernel flops of the trips it leaves out. Two counts of collective bytes, both per device:
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

from tpu_wan.tpu import hlo_flops

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "s4": 0.5, "u4": 0.5,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
    "c64": 8, "c128": 16,
}
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_CALLEES = re.compile(r"\b(?:body|condition|calls|to_apply)=%([\w.\-]+)|branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")
_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")
_CHAIN = re.compile(r'channel_id=(\d+).*?chain_id="(\d+)"')
_CONSTANT = re.compile(r"^(-?\d+)\)")
_INDEX = re.compile(r"\bindex=(\d+)")
_DIRECTION = re.compile(r"\bdirection=(\w+)")


def program_numbers(compiled, summary: dict | None = None) -> dict:
    """Per device, one call: XLA's memory analysis (bytes of arguments, outputs, aliased outputs, temporaries and
    generated code) and its cost analysis's flops plus the matmul, convolution and kernel flops of the loop trips
    it leaves out (`summary`'s "loop_trip_flops": summarize(compiled.as_text()), computed when not given)."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    summary = summarize(compiled.as_text()) if summary is None else summary
    return {"argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
            "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
            "generated_code_bytes": mem.generated_code_size_in_bytes,
            "flops": float(cost.get("flops", 0.0)) + summary["loop_trip_flops"]}


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


Instruction = tuple[str, str, str]  # (type text, op, the text after the op's opening parenthesis)


@dataclasses.dataclass
class _Module:
    """An HLO module's text, parsed: its computations in text order with their instructions, every instruction by
    name (names are unique in a module), each computation's ROOT and the entry computation."""

    computations: list[tuple[str, list[str]]]
    instructions: dict[str, Instruction]
    roots: dict[str, str]
    entry: str


def _parse(hlo_text: str) -> _Module:
    computations, instructions, roots, entry = [], {}, {}, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            computations.append((header.group(1), []))
            if line.startswith("ENTRY"):
                entry = header.group(1)
            continue
        inst = _INSTRUCTION.match(line)
        if inst and computations:
            root, name, type_text, op, rest = inst.groups()
            instructions[name] = (type_text, op, rest)
            computations[-1][1].append(name)
            if root:
                roots[computations[-1][0]] = name
    return _Module(computations, instructions, roots, entry or (computations[-1][0] if computations else ""))


def _times(module: _Module, trips: bool) -> dict[str, int]:
    """computation -> how many times one call of the module runs it: every loop body once per trip (`trips`, where
    its trip count is known) or once (not `trips`: as XLA's cost analysis counts)."""
    times = defaultdict(int)
    times[module.entry] = 1
    # Callers come after their callees in the text, so walking it backwards settles each computation's count first.
    for comp, names in reversed(module.computations):
        for name in names:
            _, op, rest = module.instructions[name]
            n = (trip_count(module, rest) or 1) if trips and op == "while" else 1
            for called, branches in _CALLEES.findall(rest):
                for callee in [called] if called else re.findall(r"%([\w.\-]+)", branches):
                    times[callee] += times[comp] * n
    return times


def _through_copies(module: _Module, name: str) -> Instruction | None:
    inst = module.instructions.get(name)
    while inst and inst[1] in ("copy", "bitcast", "convert", "reshape") and (ops := _operands(inst[2])):
        inst = module.instructions.get(ops[0])
    return inst


def _constant(module: _Module, name: str) -> int | None:
    inst = _through_copies(module, name)
    m = _CONSTANT.match(inst[2]) if inst and inst[1] == "constant" else None
    return int(m.group(1)) if m else None


def _tuple_index(module: _Module, name: str) -> int | None:
    inst = _through_copies(module, name)
    m = _INDEX.search(inst[2]) if inst and inst[1] == "get-tuple-element" else None
    return int(m.group(1)) if m else None


def trip_count(module: _Module, while_rest: str) -> int | None:
    """The trip count of a while loop (the text after `while(`): its backend config's, else the counted loop's
    (see the module docstring), else None."""
    if m := _TRIP_COUNT.search(while_rest):
        return int(m.group(1))
    cond = re.search(r"\bcondition=%([\w.\-]+)", while_rest)
    body = re.search(r"\bbody=%([\w.\-]+)", while_rest)
    init = _operands(while_rest)
    compare = module.instructions.get(module.roots.get(cond.group(1) if cond else "", ""))
    if not (body and init and compare and compare[1] == "compare"):
        return None
    a, b = (_operands(compare[2]) + [None, None])[:2]
    direction = _DIRECTION.search(compare[2])
    flip = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}
    if direction is None or direction.group(1) not in flip:
        return None
    direction = direction.group(1)
    if _tuple_index(module, b) is not None:  # N > i: the same as i < N
        a, b, direction = b, a, flip[direction]
    index, limit = _tuple_index(module, a), _constant(module, b)
    tuple_inst = _through_copies(module, init[0])
    step_inst = module.instructions.get(module.roots.get(body.group(1), ""))
    if index is None or limit is None or not tuple_inst or tuple_inst[1] != "tuple" or not step_inst:
        return None
    start = _constant(module, (_operands(tuple_inst[2]) + [None] * (index + 1))[index])
    if step_inst[1] != "tuple" or start is None:
        return None
    add = _through_copies(module, (_operands(step_inst[2]) + [None] * (index + 1))[index])
    terms = _operands(add[2]) if add and add[1] == "add" else []
    steps = [_constant(module, t) for t in terms if _tuple_index(module, t) != index]
    if len(terms) != 2 or len(steps) != 1 or not steps[0]:
        return None
    step, upward = steps[0], direction in ("LT", "LE")
    if (step > 0) != upward:
        return None
    span = (limit - start if upward else start - limit) + direction.endswith("E")  # the counter values that pass
    return max(0, -(-span // abs(step)))


def _shape(type_text: str) -> list[int]:
    m = _ARRAY.search(type_text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def matmul_flops(module: _Module, name: str) -> int:
    """Flops of one instruction that multiplies matrices (hlo_flops): a dot, a convolution (as XLA:TPU writes
    matmuls) or a custom call whose backend config carries a cost estimate (a Pallas kernel's); 0 for any other."""
    type_text, op, rest = module.instructions[name]
    operands = [_shape(module.instructions[o][0]) for o in _operands(rest)[:2] if o in module.instructions]
    return hlo_flops.flops(op, rest, _shape(type_text), operands)


def summarize(hlo_text: str) -> dict:
    """{"collectives": {kind: {"count", "bytes", "traffic_bytes"}}, "custom_calls": {target: count},
    "loop_trip_flops": the matmul flops (matmul_flops) of loop trips after the first} of one call of the module."""
    module = _parse(hlo_text)
    num_devices = int(m.group(1)) if (m := _PARTITIONS.search(hlo_text)) else 1
    types = {name: inst[0] for name, inst in module.instructions.items()}
    times, once = _times(module, trips=True), _times(module, trips=False)
    collectives = {kind: {"count": 0, "bytes": 0, "traffic_bytes": 0} for kind in COLLECTIVES}
    custom_calls: dict[str, int] = defaultdict(int)
    chained = set()
    loop_trip_flops = 0
    for comp, names in module.computations:
        n = times[comp]
        if not n:
            continue
        for name in names:
            type_text, op, rest = module.instructions[name]
            if n > once[comp]:
                loop_trip_flops += (n - once[comp]) * matmul_flops(module, name)
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
    return {"collectives": collectives, "custom_calls": dict(custom_calls), "loop_trip_flops": loop_trip_flops}

