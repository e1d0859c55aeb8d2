"""How many times each loop and branch of a compiled kernel runs, per program, for a launch's sizes.

The TTGIR (what Triton hands to LLVM) keeps a kernel's control flow as scf.for / scf.if regions
whose bounds and conditions are scalar arithmetic on the program id and the kernel's integer
arguments. `control_tree` reads those regions and the scalar ops between them; `region_counts`
evaluates them for one program id, as the program itself would: a loop's trip count from its
bounds, a branch from its condition, and scalar atomics on arrival counters in order of program id
(the order Triton's interpreter runs programs in), so "the last program to arrive finishes the
sum" is taken by exactly one program per tile, as on the GPU. Tensor values are never computed;
a bound or condition that depends on one (a loaded value) is refused with the line it is written at.
"""
from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field

Chain = tuple[tuple[str, int], ...]  # (file name, line), innermost first, as sass.Chain


@dataclass
class Region:
    """A body the program may run several times: the function, a loop's body, a branch's arm."""
    id: int
    kind: str  # "function", "for", "then", "else"
    parent: int | None
    line: Chain = ()  # where its op is written (loops and branches)
    items: list = field(default_factory=list)  # ("op", results, name, text) or ("region", id)
    # for: (iv, lb, ub, step) names; then/else: the condition's name
    header: tuple = ()
    controls: bool = False  # holds a nested region or a scalar atomic (must be evaluated)
    # a branch on an arrival counter (its condition comes from an atomic's result): it runs after the
    # programs sharing the counter arrived, so its work follows theirs rather than overlapping them
    gated: bool = False


@dataclass
class ControlTree:
    kernel: str
    arguments: list[str]  # the function's parameter names, in order
    regions: list[Region]
    chains: dict[Chain, set[int]]  # source chain -> regions holding an op written there

    def ancestors(self, region: int) -> list[int]:
        out = []
        while region is not None:
            out.append(region)
            region = self.regions[region].parent
        return out

    @functools.cached_property
    def innermost(self) -> dict[tuple[str, int], set[int]]:
        """Source line -> regions holding an op whose innermost frame it is."""
        index: dict[tuple[str, int], set[int]] = {}
        for chain, regions in self.chains.items():
            index.setdefault(chain[0], set()).update(regions)
        return index

    def arrival_gated(self, region: int) -> bool:
        return any(self.regions[r].gated for r in self.ancestors(region))

    def in_loop(self, region: int) -> bool:
        return any(self.regions[r].kind == "for" for r in self.ancestors(region))


# --------------------------------------------------------------------------------------------------
# Parsing: locations, then the function body's regions.
# --------------------------------------------------------------------------------------------------

_LOCATION = re.compile(r"^(#loc\d*) = loc\((.*)\)$", re.M)
_OP = re.compile(r"^\s*((?:%[\w]+(?::\d+)?)(?:, %[\w]+(?::\d+)?)*) = ([\w.\"]+) ?(.*)$")
_FOR = re.compile(r"scf\.for %([\w]+) = %([\w]+) to %([\w]+) step %([\w]+)")
_IF = re.compile(r"scf\.if %([\w]+)")
_TRAILING_LOC = re.compile(r"\sloc\((#loc\d*|\"[^\"]*\":\d+:\d+)\)\s*$")


def _chain(text: str, locations: dict[str, str], depth: int = 0) -> Chain:
    text = text.strip()
    if depth > 200:
        return ()
    if text.startswith("#loc"):
        return _chain(locations.get(text, "unknown"), locations, depth + 1)
    if m := re.fullmatch(r'"([^"]*)":(\d+):\d+', text):
        return ((os.path.basename(m.group(1)), int(m.group(2))),)
    if m := re.fullmatch(r"callsite\((\S+) at (\S+)\)", text):
        return _chain(m.group(1), locations, depth + 1) + _chain(m.group(2), locations, depth + 1)
    if m := re.fullmatch(r'"[^"]*"\((.*)\)', text):
        return _chain(m.group(1), locations, depth + 1)
    if m := re.match(r"fused(?:<[^>]*>)?\[([^,\]]+)", text):
        return _chain(m.group(1), locations, depth + 1)
    return ()


def control_tree(ttgir: str, kernel: str | None = None) -> ControlTree:
    """The regions of the kernel's tt.func (the first public one when `kernel` is None)."""
    locations = dict(_LOCATION.findall(ttgir))
    lines = ttgir.splitlines()
    start = next((n for n, line in enumerate(lines) if "tt.func public @" in line
                  and (kernel is None or f"@{kernel}(" in line)), None)
    if start is None:
        raise ValueError(f"no tt.func {kernel or ''} in the TTGIR")
    header = lines[start]
    name = re.search(r"@(\w+)\(", header).group(1)
    arguments = re.findall(r"%([\w]+): ", header.split(" attributes ")[0])
    regions = [Region(0, "function", None)]
    stack = [0]  # open regions; None marks a region that is not control flow (a reduce's combiner)
    chains: dict[Chain, set[int]] = {}
    arrival: set[str] = set()  # values computed from a scalar atomic's result
    for n in range(start + 1, len(lines)):
        line = lines[n]
        stripped = line.strip()
        if not stripped:
            continue
        current = next(r for r in reversed(stack) if r is not None)
        if stripped.startswith("}"):
            closing = stack.pop()
            if not stack:
                break  # the function's end
            loc = _TRAILING_LOC.search(stripped)
            if closing is not None and loc and not regions[closing].line:
                regions[closing].line = _chain(loc.group(1), locations)
            if stripped.startswith("} else {"):
                then = regions[closing]
                region = Region(len(regions), "else", then.parent, then.line, header=then.header,
                                gated=then.gated)
                regions.append(region)
                regions[then.parent].items.append(("region", region.id))
                stack.append(region.id)
            continue
        loc = _TRAILING_LOC.search(stripped)
        chain = _chain(loc.group(1), locations) if loc else ()
        if chain:
            chains.setdefault(chain, set()).add(current)
        body = _TRAILING_LOC.sub("", stripped)
        if m := _FOR.search(body):
            region = Region(len(regions), "for", current, header=m.groups())
        elif (m := _IF.search(body)) and body.endswith("{"):
            region = Region(len(regions), "then", current, header=(m.group(1),), gated=m.group(1) in arrival)
        elif body.endswith("{"):
            if "scf.while" in body:
                raise ValueError(f"{name}: scf.while is not counted (line {n + 1} of the TTGIR)")
            stack.append(None)  # a combiner region (tt.reduce, tt.scan): part of its op
            continue
        else:
            if m := _OP.match(body):  # an op with results: an op without any sets nothing a bound reads
                results = [r.split(":")[0].lstrip("%") for r in m.group(1).split(", ")]
                regions[current].items.append(("op", results, m.group(2), m.group(3)))
                if m.group(2) == "tt.atomic_rmw" and "tensor<" not in m.group(3):
                    regions[current].controls = True
                    arrival.update(results)
                elif arrival.intersection(_operands(m.group(3))):
                    arrival.update(results)
            continue
        regions.append(region)
        regions[current].items.append(("region", region.id))
        stack.append(region.id)
    for r in reversed(regions):  # a region holding a region that must be evaluated must be, too
        if r.parent is not None and (r.controls or r.kind != "function"):
            regions[r.parent].controls = True
    # A region's own op line (the loop or branch) belongs to its parent too: its bounds are there.
    for r in regions:
        if r.line and r.parent is not None:
            chains.setdefault(r.line, set()).add(r.parent)
    return ControlTree(name, arguments, regions, chains)


# --------------------------------------------------------------------------------------------------
# Evaluation: scalar integer arithmetic, as the program computes it.
# --------------------------------------------------------------------------------------------------

class Unknown(Exception):
    """A bound or condition depends on a value the analysis does not compute."""


def _trunc_div(a, b):
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


_BINARY = {
    "arith.addi": lambda a, b: a + b, "arith.subi": lambda a, b: a - b, "arith.muli": lambda a, b: a * b,
    "arith.divsi": _trunc_div, "arith.divui": lambda a, b: a // b,
    "arith.remsi": lambda a, b: a - b * _trunc_div(a, b), "arith.remui": lambda a, b: a % b,
    "arith.ceildivsi": lambda a, b: -((-a) // b) if b > 0 else _trunc_div(a, b),
    "arith.ceildivui": lambda a, b: -((-a) // b), "arith.floordivsi": lambda a, b: a // b,
    "arith.minsi": min, "arith.maxsi": max, "arith.minui": min, "arith.maxui": max,
    "arith.andi": lambda a, b: a & b, "arith.ori": lambda a, b: a | b, "arith.xori": lambda a, b: a ^ b,
    "arith.shli": lambda a, b: a << b, "arith.shrsi": lambda a, b: a >> b, "arith.shrui": lambda a, b: a >> b,
}
_COMPARE = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "slt": lambda a, b: a < b,
            "sle": lambda a, b: a <= b, "sgt": lambda a, b: a > b, "sge": lambda a, b: a >= b,
            "ult": lambda a, b: a < b, "ule": lambda a, b: a <= b, "ugt": lambda a, b: a > b,
            "uge": lambda a, b: a >= b}
_UNARY = ("arith.extsi", "arith.extui", "arith.trunci", "arith.index_cast", "arith.index_castui")
_AXES = {"x": 0, "y": 1, "z": 2}


def _operands(text: str) -> list[str]:
    return [o.lstrip("%") for o in re.findall(r"%[\w]+", text.split(" : ")[0])]


def _scalar(text: str) -> bool:
    return "tensor<" not in text


class Evaluator:
    """Evaluates a ControlTree program by program, with one shared memory of scalar atomics (so
    run the programs of a launch in order of program id, each once)."""

    def __init__(self, tree: ControlTree, arguments: dict, grid: tuple[int, ...]):
        self.tree = tree
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.base = {}
        for name in tree.arguments:
            value = arguments.get(name)
            self.base[name] = ("ptr", name, 0) if isinstance(value, dict) else value
        self.memory: dict[tuple[str, int], int] = {}  # scalar atomics' cells, zero until written

    def program(self, pid: tuple[int, int, int]) -> dict[int, int]:
        """{region id: times its body runs} for the program with ids `pid` (x, y, z)."""
        counts: dict[int, int] = {0: 1}
        self._run(0, dict(self.base), pid, 1, counts)
        return counts

    # A region's body, `times` times over, in env (updated in place).
    def _run(self, rid: int, env: dict, pid, times: int, counts: dict[int, int]) -> None:
        for item in self.tree.regions[rid].items:
            if item[0] == "op":
                self._op(item, env, pid)
                continue
            child = self.tree.regions[item[1]]
            if child.kind == "for":
                self._loop(child, env, pid, times, counts)
            else:
                cond = env.get(child.header[0])
                if cond is None:
                    raise Unknown(f"the branch at {_where(child)} depends on a value not computed")
                if bool(cond) == (child.kind == "then"):
                    counts[child.id] = counts.get(child.id, 0) + times
                    if child.controls:
                        self._run(child.id, env, pid, times, counts)

    def _loop(self, loop: Region, env: dict, pid, times: int, counts: dict[int, int]) -> None:
        iv, lb, ub, step = loop.header
        lb, ub, step = env.get(lb), env.get(ub), env.get(step)
        if None in (lb, ub, step) or step <= 0:
            raise Unknown(f"the bounds of the loop at {_where(loop)} depend on a value not computed")
        trips = max(0, math.ceil((ub - lb) / step))
        counts[loop.id] = counts.get(loop.id, 0) + trips * times
        if not loop.controls or not trips:
            return
        # Once for all trips, where nothing inside depends on the trip (the common case) ...
        trial, scratch = dict(env, **{iv: None}), {}
        memory = dict(self.memory)
        try:
            self._run(loop.id, trial, pid, trips * times, scratch)
            if self.memory != memory:
                raise Unknown("an atomic inside a loop")
        except Unknown:
            self.memory = memory
        else:
            for k, v in scratch.items():
                counts[k] = counts.get(k, 0) + v
            return
        # ... else trip by trip.
        for t in range(trips):
            env[iv] = lb + t * step
            self._run(loop.id, env, pid, times, counts)

    def _op(self, item, env: dict, pid) -> None:
        _, results, name, text = item
        value = None
        try:
            if not _scalar(text):
                value = None
            elif name == "arith.constant":
                literal = text.split(" : ")[0].strip()
                value = {"true": 1, "false": 0}.get(literal)
                if value is None and re.fullmatch(r"-?\d+", literal):
                    value = int(literal)
            elif name in _BINARY:
                a, b = (env.get(o) for o in _operands(text)[:2])
                value = None if a is None or b is None else _BINARY[name](a, b)
            elif name == "arith.cmpi":
                predicate = text.split(",")[0].strip()
                a, b = (env.get(o) for o in _operands(text)[:2])
                value = None if a is None or b is None else int(_COMPARE[predicate](a, b))
            elif name == "arith.select":
                c, a, b = (env.get(o) for o in _operands(text)[:3])
                value = None if c is None else (a if c else b)
            elif name in _UNARY:
                value = env.get(_operands(text)[0])
            elif name == "tt.get_program_id":
                value = pid[_AXES[text.split()[0]]]
            elif name == "tt.get_num_programs":
                value = self.grid[_AXES[text.split()[0]]]
            elif name == "tt.addptr":
                p, off = (env.get(o) for o in _operands(text)[:2])
                value = None if p is None or off is None else (p[0], p[1], p[2] + off)
            elif name == "tt.atomic_rmw":
                value = self._atomic(text, env)
        except (ZeroDivisionError, TypeError, KeyError, IndexError):
            value = None
        for r in results:
            env[r] = value

    def _atomic(self, text: str, env: dict):
        kind = text.split(",")[0].strip()
        pointer, operand = (env.get(o) for o in _operands(text)[:2])
        if pointer is None or operand is None or kind not in ("add", "exch", "max", "min"):
            return None
        cell = (pointer[1], pointer[2])
        old = self.memory.get(cell, 0)
        self.memory[cell] = {"add": old + operand, "exch": operand, "max": max(old, operand),
                             "min": min(old, operand)}[kind]
        return old


def _where(region: Region) -> str:
    return f"{region.line[0][0]}:{region.line[0][1]}" if region.line else f"region {region.id}"


def program_ids(grid: tuple[int, ...]):
    """Every program id of a grid, in the order CUDA numbers blocks (x fastest)."""
    grid = tuple(grid) + (1,) * (3 - len(grid))
    for z in range(grid[2]):
        for y in range(grid[1]):
            for x in range(grid[0]):
                yield (x, y, z)
