"""SASS as data: the instructions of a kernel (nvdisasm -c -gi), the source each came from, its basic
blocks and its loops.

Each instruction keeps its opcode and the chain of source lines it was inlined through, innermost
first, as (file name, line) pairs: the same chains TTGIR locations give (trips.py), which is how a
block of machine code is tied to the loop or branch of the kernel it executes for. A loop is a
backward branch: the instructions from its target to the branch run once per trip.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

_FILE = re.compile(r'^\s*//## File "([^"]*)", line (\d+)(?: inlined at "([^"]*)", line (\d+))?')
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\.(L_x_\d+):")
_TARGET = re.compile(r"`\(\.(L_x_\d+)\)")

Chain = tuple[tuple[str, int], ...]  # (file name, line), innermost first


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # "LDG.E.128", "HMMA.1684.F32.TF32", "@P0 BRA" keeps "BRA": the predicate is separate
    predicated: bool
    target: int | None  # a branch's target address
    chain: Chain
    operands: str = ""  # the text after the opcode (its predicate included)


@dataclass
class Block:
    """A basic block: straight-line instructions, all executed the same number of times."""
    first: int  # index of its first instruction in Sass.instructions
    last: int  # index of its last (inclusive)
    loop: int | None = None  # the innermost loop (index in Sass.loops) it lies in


@dataclass
class Loop:
    head: int  # instruction index of the backward branch's target
    tail: int  # instruction index of the backward branch
    parent: int | None = None  # the enclosing loop
    blocks: list[int] = field(default_factory=list)


@dataclass
class Sass:
    instructions: list[Instruction]
    blocks: list[Block]
    loops: list[Loop]

    def block_instructions(self, b: int) -> list[Instruction]:
        block = self.blocks[b]
        return self.instructions[block.first:block.last + 1]


_BRANCHES = ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "CALL", "BPT")


def _opcode(text: str) -> tuple[str, bool]:
    predicated = text.startswith("@")
    words = text.split()
    return (words[1] if predicated else words[0]), predicated


def parse(text: str, kernel: str | None = None) -> Sass:
    """The instructions of the kernel's .text section in nvdisasm -c -gi output (the first function
    when `kernel` is None), its basic blocks and loops."""
    instructions: list[Instruction] = []
    labels: dict[str, int] = {}
    targets: list[str | None] = []
    frames: list[tuple[str, int]] = []
    fresh = True  # the next //## line starts a new chain
    inside = False
    for line in text.splitlines():
        if line.startswith("//----"):  # a section's header: "//---- .text.<function> ----"
            name = line.split(".text.")[1].split()[0] if ".text." in line else None
            if inside and instructions:
                break  # the next function
            inside = name is not None and (kernel is None or name == kernel)
            continue
        if not inside:
            continue
        if m := _LABEL.match(line.strip()):
            labels[m.group(1)] = len(instructions)
            continue
        if m := _FILE.match(line):
            if fresh:
                frames, fresh = [], False
            frames.append((os.path.basename(m.group(1)), int(m.group(2))))
            continue
        if m := _INSTRUCTION.match(line):
            opcode, predicated = _opcode(m.group(2))
            target = _TARGET.search(m.group(2))
            targets.append(target.group(1) if target else None)
            instructions.append(Instruction(int(m.group(1), 16), opcode, predicated, None, tuple(frames),
                                            m.group(2)))
            fresh = True
    if not instructions:
        raise ValueError(f"no SASS instructions for {kernel or 'the first function'} in the disassembly")
    resolved = [labels.get(t) if t else None for t in targets]
    instructions = [Instruction(i.address, i.opcode, i.predicated, t, i.chain, i.operands)
                    for i, t in zip(instructions, resolved)]
    return Sass(instructions, *_structure(instructions))


def _structure(instructions: list[Instruction]) -> tuple[list[Block], list[Loop]]:
    # Leaders: the first instruction, every branch target, every instruction after a branch.
    leaders = {0}
    for n, ins in enumerate(instructions):
        if ins.opcode in _BRANCHES or ins.opcode in ("BSYNC", "WARPSYNC"):
            leaders.add(n + 1)
        if ins.target is not None:
            leaders.add(ins.target)
    starts = sorted(s for s in leaders if s < len(instructions))
    blocks = [Block(s, e - 1) for s, e in zip(starts, starts[1:] + [len(instructions)])]
    # Loops: backward branches, outermost (longest) first so that parents come before children.
    loops = sorted((Loop(ins.target, n) for n, ins in enumerate(instructions)
                    if ins.opcode == "BRA" and ins.target is not None and ins.target <= n),
                   key=lambda lp: lp.head - lp.tail)
    for i, loop in enumerate(loops):
        enclosing = [j for j in range(i) if loops[j].head <= loop.head and loop.tail <= loops[j].tail]
        loop.parent = enclosing[-1] if enclosing else None
    for b, block in enumerate(blocks):
        inside = [i for i, lp in enumerate(loops) if lp.head <= block.first and block.last <= lp.tail]
        block.loop = inside[-1] if inside else None
        if block.loop is not None:
            loops[block.loop].blocks.append(b)
    return blocks, loops


# --------------------------------------------------------------------------------------------------
# What an instruction is, for the timing model.
# --------------------------------------------------------------------------------------------------

def is_global_load(opcode: str) -> bool:
    """A load from global memory whose value the program waits for (LDG; LDGSTS copies to shared
    memory asynchronously, and is waited for at its LDGDEPBAR); atomics return a value too."""
    return opcode.startswith(("LDG", "LDGSTS", "ATOM", "ATOMG"))


def is_fence(opcode: str) -> bool:
    """A memory barrier: the acquire/release of an atomic counter waits for memory to settle."""
    return opcode.startswith(("MEMBAR", "FENCE", "ERRBAR"))


# FLOPs of one warp-wide tensor-core instruction (2 per multiply-add of its M x N x K shape), by
# the shape in its opcode: HMMA.1688 is m16n8k8, HMMA.16816 m16n8k16; HGMMA (sm_90's wgmma) is
# 64xNxK for a warp group, and each of its 4 warps issues it: a quarter of the FLOPs per issue.
_HMMA = re.compile(r"^HMMA\.(\d\d)(\d)(\d+)")
_HGMMA = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
_DMMA = re.compile(r"^DMMA\.(\d\d)(\d)(\d+)")


def mma_flops(opcode: str) -> int:
    """Tensor-core FLOPs of one issue of a warp's MMA instruction (0 for anything else)."""
    if m := _HMMA.match(opcode) or _DMMA.match(opcode):
        return 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    if m := _HGMMA.match(opcode):
        return 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) // 4
    return 0


def fma_flops(opcode: str) -> int:
    """CUDA-core FLOPs of one warp-wide issue (FFMA: 2 per lane; FADD/FMUL: 1)."""
    if opcode.startswith(("FFMA", "DFMA")):
        return 64
    if opcode.startswith(("FADD", "FMUL", "DADD", "DMUL")):
        return 32
    return 0


# --------------------------------------------------------------------------------------------------
# Dependent loads: how many memory waits a straight run of instructions makes one after another.
# --------------------------------------------------------------------------------------------------

_REGISTER = re.compile(r"\b(U?R\d+|U?P\d)(\.64|\.128)?")
_NO_DESTINATION = ("ST", "RED", "BRA", "BAR", "EXIT", "MEMBAR", "FENCE", "ERRBAR", "CGAERRBAR", "BSYNC", "BSSY",
                   "WARPSYNC", "NOP", "CALL", "RET", "DEPBAR", "LDGDEPBAR", "ARRIVES", "SYNCS", "CCTL")


def _registers(text: str) -> list[str]:
    out = []
    for name, width in _REGISTER.findall(text):
        n = {".64": 2, ".128": 4}.get(width, 1)
        kind, index = re.match(r"(U?[RP])(\d+)", name).groups()
        out += [f"{kind}{int(index) + k}" for k in range(n)]
    return out


def _width(opcode: str) -> int:
    return 4 if ".128" in opcode else 2 if ".64" in opcode else 1


_TYPE = re.compile(r"[FSU]\d+")


def destination_width(opcode: str) -> int:
    """Registers an instruction's first destination names from its first: a 64-bit result (an address
    from IMAD.WIDE, CS2R's zero pair, a float64) fills two, an MMA's accumulator fragment four (m16n8,
    float32) and LDSM one per 8x8 matrix. Counting only the first would leave the second holding
    whatever it held before, a loaded value's depth included: a wait that is not there."""
    parts = opcode.split(".")
    op, types = parts[0], [p for p in parts[1:] if _TYPE.fullmatch(p)]
    if op in ("HMMA", "IMMA"):
        return 4 if "F32" in types or "S32" in types else 2
    if op == "DMMA":
        return 2
    if op == "LDSM":
        return int(parts[-1]) if parts[-1] in ("2", "4") else 1
    if op == "CS2R":
        return 1 if "32" in parts else 2
    if "WIDE" in parts or op in ("DADD", "DMUL", "DFMA", "DMNMX"):
        return 2
    if op in ("F2F", "I2F"):  # the first type is the result's, where it is a float
        return 2 if types and types[0] == "F64" else 1
    if op == "F2I":
        return 2 if types and types[0] in ("S64", "U64") else 1
    return _width(opcode)


def load_depth(instructions: list[Instruction]) -> int:
    """The longest chain of global loads (and atomics) in a straight run of instructions in which each
    load's address or predicate comes from an earlier one's value, through the registers that
    carry it (a gather's index loaded, then the value at it): each link is one wait for memory. A
    memory barrier (an atomic counter's release/acquire) waits for everything before it. Values
    from outside the run count as ready; a value through shared memory (a layout conversion: STS,
    barrier, LDS) keeps its chain; LDGSTS (an asynchronous copy to shared memory, Triton's
    pipelining) ends one: nothing waits on its registers."""
    depth: dict[str, int] = {}
    floor = deepest = shared = 0  # shared: the deepest value stored to shared memory so far
    for ins in instructions:
        text = ins.operands.split(None, 1)[1] if ins.predicated else ins.operands
        text = text.split(None, 1)[1] if " " in text else ""  # drop the opcode
        parts = [p.strip() for p in re.split(r",(?![^\[]*\])", text) if p.strip()]
        predicate = _registers(ins.operands.split()[0]) if ins.predicated else []
        writes = not ins.opcode.startswith(_NO_DESTINATION) and parts and _REGISTER.match(parts[0])
        dest = _registers(parts[0]) if writes else []
        if dest:
            kind, index = re.match(r"(U?[RP])(\d+)", dest[0]).groups()
            dest = [f"{kind}{int(index) + k}" for k in range(destination_width(ins.opcode))]
        sources = predicate + [r for p in (parts[1:] if writes else parts) for r in _registers(p)]
        ready = max((depth.get(r, 0) for r in sources), default=0)
        if ins.opcode.startswith(("STS", "STSM")):
            shared = max(shared, ready)
        elif ins.opcode.startswith(("LDS", "LDSM")):  # a value back from shared memory (a layout change)
            ready = max(ready, shared)
        if is_fence(ins.opcode):
            floor = deepest = deepest + 1
            continue
        if is_global_load(ins.opcode) and not ins.opcode.startswith("LDGSTS"):
            ready = max(ready, floor) + 1
            deepest = max(deepest, ready)
        for r in dest:
            if r not in ("RZ", "PT", "URZ", "UPT"):
                depth[r] = ready
    return deepest


# --------------------------------------------------------------------------------------------------
# Loops ptxas unrolled: the PTX it was given keeps one copy of each loop's body.
# --------------------------------------------------------------------------------------------------

_PTX_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_PTX_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_PTX_LOC = re.compile(r"\.loc\s+\d+ (\d+) \d+.*// ([^:\s]+):\d+:\d+")


def _ptx_loops(ptx: str) -> list[tuple[set, int]]:
    """(source lines, global loads of its own) of every loop in a PTX function: a backward branch."""
    lines = ptx.splitlines()
    labels = {m.group(1): n for n, line in enumerate(lines) if (m := _PTX_LABEL.match(line.strip()))}
    loops = [(labels[m.group(1)], n) for n, line in enumerate(lines)
             if (m := _PTX_BRANCH.search(line)) and m.group(1) in labels and labels[m.group(1)] <= n]
    out = []
    for head, tail in loops:
        inner = [(h, t) for h, t in loops if head <= h and t <= tail and (h, t) != (head, tail)]
        own = [n for n in range(head, tail + 1) if not any(h <= n <= t for h, t in inner)]
        where = set()
        for n in range(head, tail + 1):
            if m := _PTX_LOC.search(lines[n]):
                if m.group(1) != "0":
                    where.add((m.group(2), int(m.group(1))))
        out.append((where, sum("ld.global" in lines[n] for n in own)))
    return out


def unroll_factors(code: Sass, ptx: str) -> dict[int, int]:
    """Per SASS loop, how many copies of its PTX loop's body one trip runs (ptxas unrolls small
    loops): its own global loads over those of the PTX loop whose source lines it shares most.
    1 where it cannot tell (no loads in either)."""
    candidates = _ptx_loops(ptx)
    out = {}
    for i, loop in enumerate(code.loops):
        own = [ins for b in loop.blocks if code.blocks[b].loop == i for ins in code.block_instructions(b)]
        where = {ins.chain[0] for ins in own if ins.chain}
        loads = sum(is_global_load(ins.opcode) and not ins.opcode.startswith("ATOM") for ins in own)
        best = max(candidates, key=lambda c: len(where & c[0]) / max(1, len(where | c[0])), default=None)
        factor = 1
        if best and best[1] and loads and where & best[0]:
            factor = max(1, round(loads / best[1]))
        out[i] = factor
    return out
