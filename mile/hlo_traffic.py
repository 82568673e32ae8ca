"""Collective traffic per chip of a compiled HLO module: what each chip sends per step.

XLA's `cost_analysis()` counts a loop body once and says nothing of collectives, so this reads
the compiled HLO text itself:

  1. every collective instruction, with its result type and the size n of its device groups;
  2. how often its computation runs per step: the call graph from ENTRY, where a while loop's
     body runs its trip count (read from the loop condition, `counter < N`, and the counter's
     initial constant) and every other call (fusions, calls, branches) runs once per caller run;
  3. bytes each chip sends for one run, in the ring model of each collective:
        all-gather          (n-1)/n x result        (the result is the gathered array)
        reduce-scatter      (n-1)   x result        (the input is n results)
        all-reduce          2(n-1)/n x result       (a reduce-scatter, then an all-gather)
        all-to-all          (n-1)/n x result
        collective-permute  result                  (each chip sends its buffer once)
     XLA:TPU writes a reduce-scatter as an all-reduce inside an `all-reduce-scatter` fusion
     (followed by a slice); it is counted as the reduce-scatter it runs as.

Trip counts it cannot read (a loop not of the form above) are counted once and reported, so
the total is then a lower bound. A conditional's branches are each counted once per run (an
upper bound for the branch not taken). The result is an estimate for a roofline, not a
measurement: real collectives also pay latency, and XLA overlaps them with compute.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

__all__ = ["collective_traffic", "DTYPE_BYTES"]

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip

_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[^\s(]+)\s*\(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>\S+)\s*=\s*(?P<type>.*?)\s+(?P<op>[a-z][\w-]*)\((?P<args>.*)$")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*(?:e\d+m\d+\w*)?)\[(?P<dims>[\d,]*)\]")
_CALLEES = re.compile(r"\b(?:calls|to_apply|true_computation|false_computation)=%([^\s,)}]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_WHILE = re.compile(r"\bcondition=%(?P<cond>[^\s,]+),\s*body=%(?P<body>[^\s,]+)")


def _bytes(type_text: str) -> list[int]:
    """Byte size of each array in an HLO type (a tuple gives several)."""
    sizes = []
    for m in _ARRAY.finditer(re.sub(r"\{[^}]*\}", "", type_text)):
        dims = [int(d) for d in m.group("dims").split(",") if d]
        sizes.append(math.prod(dims) * DTYPE_BYTES.get(m.group("dtype"), 4))
    return sizes


def _group_size(args: str, num_devices: int) -> int:
    """Devices per group: `replica_groups={{0,1},{2,3}}`, the iota form `[2,4]<=[8]`, or all."""
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", args)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", args)
    if listed and listed.group(1):
        return len(listed.group(1).split(","))
    return num_devices


def _parse(hlo_text: str):
    """({computation: [instruction dicts]}, {instruction name: dict}, entry name)."""
    computations, instructions, entry, current = {}, {}, None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and line.rstrip().endswith("{"):
            current = header.group("name")
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        m = _INSTRUCTION.match(line) if current else None
        if m:
            inst = {**m.groupdict(), "computation": current}
            computations[current].append(inst)
            instructions[inst["name"]] = inst
    return computations, instructions, entry


def _operands(inst) -> list[str]:
    head = inst["args"].split(")", 1)[0]
    return re.findall(r"%([^\s,)]+)", head)


def _constant(instructions, name: str, depth: int = 8) -> int | None:
    """The integer a value is, following copies and bitcasts back to a constant."""
    for _ in range(depth):
        inst = instructions.get(name)
        if inst is None:
            return None
        if inst["op"] == "constant":
            value = re.match(r"\s*(-?\d+)\)", inst["args"])
            return int(value.group(1)) if value else None
        if inst["op"] not in ("copy", "bitcast", "convert") or not _operands(inst):
            return None
        name = _operands(inst)[0]
    return None


def _loop_compare(instructions, computations, cond: str):
    """(compare instruction, its two operands as names in `cond`) of a loop condition's root,
    looking inside the fusion XLA:CPU wraps it in."""
    root = computations.get(cond, [None])[-1]
    if root is None:
        return None, []
    if root["op"] == "fusion":
        callee = _CALLEES.search(root["args"])
        inner = computations.get(callee.group(1), []) if callee else []
        compare = inner[-1] if inner and inner[-1]["op"] == "compare" else None
        if compare is None:
            return None, []
        outer = _operands(root)
        mapped = []
        for name in _operands(compare):  # parameter(k) inside the fusion = operand k outside
            k = re.match(r"\s*(\d+)\)", instructions[name]["args"]) if instructions[name]["op"] == "parameter" else None
            mapped.append(outer[int(k.group(1))] if k and int(k.group(1)) < len(outer) else name)
        return compare, mapped
    return (root, _operands(root)) if root["op"] == "compare" else (None, [])


def _trip_count(instructions, computations, loop) -> int | None:
    """The trip count XLA recorded (`known_trip_count`), else N - start for a loop whose
    condition is `counter < N` (or `<= N`: one more)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop["args"])
    if known:
        return int(known.group(1))
    cond = _WHILE.search(loop["args"]).group("cond")
    root, ops = _loop_compare(instructions, computations, cond)
    if root is None:
        return None
    direction = re.search(r"direction=(\w+)", root["args"])
    if not direction or direction.group(1) not in ("LT", "LE") or len(ops) != 2:
        return None
    counter, limit = instructions.get(ops[0]), _constant(instructions, ops[1])
    if counter is None or counter["op"] != "get-tuple-element" or limit is None:
        return None
    index = int(re.search(r"index=(\d+)", counter["args"]).group(1))
    init_tuple = instructions.get(_operands(loop)[0]) if _operands(loop) else None
    if init_tuple is None or init_tuple["op"] != "tuple" or index >= len(_operands(init_tuple)):
        return None
    start = _constant(instructions, _operands(init_tuple)[index])
    if start is None:
        return None
    return max(0, limit - start + (direction.group(1) == "LE"))


def _run_counts(computations, instructions, entry):
    """How many times each computation runs per execution of ENTRY, and the loops whose trip
    count could not be read (counted once)."""
    edges = defaultdict(list)  # caller -> [(callee, runs per caller run)]
    unknown = []
    for name, body in computations.items():
        for inst in body:
            loop = _WHILE.search(inst["args"]) if inst["op"] == "while" else None
            if loop:
                trips = _trip_count(instructions, computations, inst)
                if trips is None:
                    unknown.append(inst["name"])
                edges[name] += [(loop.group("body"), 1 if trips is None else trips), (loop.group("cond"), 1)]
            for callee in _CALLEES.findall(inst["args"]):
                edges[name].append((callee, 1))
            for group in _BRANCHES.findall(inst["args"]):
                edges[name] += [(c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip()]
    # Callers before callees: depth-first post-order from ENTRY, reversed.
    order, seen = [], set()

    def visit(c):
        seen.add(c)
        for callee, _ in edges[c]:
            if callee not in seen:
                visit(callee)
        order.append(c)

    visit(entry)
    runs = defaultdict(int)
    runs[entry] = 1
    for caller in reversed(order):
        for callee, times in edges[caller]:
            runs[callee] += runs[caller] * times
    return runs, unknown


def collective_traffic(hlo_text: str, num_devices: int) -> dict:
    """Bytes each chip sends per step through collectives, in all and by kind (see the module
    docstring for the model), with the count of collective runs and the unread trip counts."""
    computations, instructions, entry = _parse(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text; pass compiled.as_text()")
    runs, unknown = _run_counts(computations, instructions, entry)
    by_kind = {k: 0.0 for k in _KINDS}
    calls = {k: 0 for k in _KINDS}
    for name, body in computations.items():
        for inst in body:
            op = inst["op"].removesuffix("-start")
            if op not in _KINDS or runs[name] == 0:
                continue
            sizes = _bytes(inst["type"])
            n = _group_size(inst["args"], num_devices)
            if inst["op"].endswith("-start") and op in ("all-gather", "collective-permute"):
                sizes = [max(sizes)]  # (operand, result, [sync flags]): the result moves
            result = sum(sizes)
            if op == "all-reduce" and name.startswith("all-reduce-scatter"):
                op, result = "reduce-scatter", result / n  # its result is the slice it keeps
            sent = {
                "all-gather": (n - 1) / n * result,
                "reduce-scatter": (n - 1) * result,
                "all-reduce": 2 * (n - 1) / n * result,
                "all-to-all": (n - 1) / n * result,
                "collective-permute": result,
            }[op]
            by_kind[op] += sent * runs[name]
            calls[op] += runs[name]
    return {
        "bytes_per_chip": sum(by_kind.values()),
        "bytes_by_kind": by_kind,
        "runs_by_kind": calls,
        "unread_trip_counts": len(unknown),
    }
