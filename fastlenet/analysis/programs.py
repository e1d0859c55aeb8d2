"""What each program of a launch executes, from its SASS weighted by its loops' trip counts.

Every SASS basic block is tied to the TTGIR region it runs in (trips.py): by the source chains of
its instructions, and, inside a SASS loop, to the TTGIR loop most of that loop's instructions come
from. A program then issues, per warp, the sum over blocks of the block's instructions times the
times its region runs for that program. Programs that run the same counts are one class: a launch
has few (grad-input tiles, weight-gradient tiles, the programs that also finish a sum).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from . import sass as S
from .trips import ControlTree, Evaluator, control_tree, program_ids


@dataclass(frozen=True)
class RegionCode:
    """The SASS a region's body runs each time it runs."""
    instructions: int  # warp instructions issued (predicated-off ones issue too)
    loads: int  # memory waits one after another per run: the longest chain of dependent loads (sass.load_depth)
    mma_flops: int  # tensor-core FLOPs per warp
    fma_flops: int  # CUDA-core FLOPs per warp (FFMA 2 a lane, FADD/FMUL 1)
    unroll: int = 1  # a loop's body copies ptxas put in one SASS trip: the SASS runs trips // unroll times
    # ptxas's remainder loop of an unrolled one (one copy a trip): runs trips % unroll times
    remainder_instructions: int = 0
    remainder_loads: int = 0


@dataclass(frozen=True)
class ProgramClass:
    """Programs that run the same work."""
    programs: int
    instructions: int  # per warp, over the whole program
    dependent: int  # waits for memory one after another (loop trips with loads, and straight-line ones)
    mma_flops: int  # per warp
    fma_flops: int  # per warp
    trips: int  # loop trips, all loops
    # the part of instructions and dependent run in branches on an arrival counter (a finishing sum)
    gated_instructions: int = 0
    gated_dependent: int = 0


@dataclass(frozen=True)
class LaunchWork:
    kernel: str
    grid: tuple[int, ...]
    num_warps: int
    classes: tuple[ProgramClass, ...]
    regions: dict  # region id -> RegionCode fields plus kind and source line, for the report
    unmapped_loops: int  # SASS loops tied to no TTGIR loop (counted once per run of their block's region)

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "grid": list(self.grid), "num_warps": self.num_warps,
                "classes": [asdict(c) for c in self.classes], "regions": self.regions,
                "unmapped_loops": self.unmapped_loops}


def _candidates(tree: ControlTree, chain: S.Chain) -> set[int]:
    """Regions holding an op written at `chain`, or at its longest outer part that any op has
    (ptxas may attribute an instruction to a line inside a helper that no TTGIR op keeps); where
    the SASS keeps no inlining chain (Triton 3.6's line info: the innermost line only), every region
    holding an op whose innermost line it is."""
    for start in range(len(chain)):
        found = tree.chains.get(chain[start:])
        if found:
            return found
    if len(chain) == 1:
        return tree.innermost.get(chain[0], set())
    return set()


def _innermost_loop(tree: ControlTree, region: int) -> int | None:
    return next((r for r in tree.ancestors(region) if tree.regions[r].kind == "for"), None)


def _outside_loops(tree: ControlTree, region: int) -> int:
    """The innermost ancestor of `region` that no loop encloses (straight-line code of a loop's
    region outside the SASS loop: its set-up, or a loop ptxas unrolled completely)."""
    for r in tree.ancestors(region):
        if not tree.in_loop(r):
            return r
    return 0


def assign_blocks(code: S.Sass, tree: ControlTree) -> tuple[list[int], int]:
    """The region each SASS block runs in, and how many SASS loops matched no TTGIR loop."""
    loop_of: dict[int, int | None] = {}
    unmapped = 0
    for i, loop in enumerate(code.loops):
        votes: Counter = Counter()
        for b in loop.blocks:
            if code.blocks[b].loop != i:
                continue
            for ins in code.block_instructions(b):
                for r in _candidates(tree, ins.chain):
                    if (t := _innermost_loop(tree, r)) is not None:
                        votes[t] += 1
        loop_of[i] = votes.most_common(1)[0][0] if votes else None
        trivial = loop.head == loop.tail  # a lone branch to itself: the trap after the last EXIT
        unmapped += loop_of[i] is None and not trivial
    assigned, previous = [], 0
    for b, block in enumerate(code.blocks):
        votes = Counter()
        target = loop_of.get(block.loop) if block.loop is not None else None
        for ins in code.block_instructions(b):
            for r in _candidates(tree, ins.chain):
                if target is not None:
                    if _innermost_loop(tree, r) == target:
                        votes[r] += 1
                elif block.loop is None:
                    votes[_outside_loops(tree, r)] += 1
        if votes:
            region = votes.most_common(1)[0][0]
        elif target is not None:
            region = target
        else:
            region = previous
        assigned.append(region)
        if block.loop is None:
            previous = region
    return assigned, unmapped


def region_code(code: S.Sass, tree: ControlTree, assigned: list[int],
                unroll: dict[int, int] | None = None) -> dict[int, RegionCode]:
    """Per region, the SASS its body runs each time: its blocks in address order (a loop's: one SASS
    trip, `unroll` source trips where ptxas unrolled it; sass.unroll_factors, by SASS loop)."""
    blocks: dict[int, list[int]] = {}
    for b, region in enumerate(assigned):
        blocks.setdefault(region, []).append(b)
    out = {}
    for region, bs in blocks.items():
        loops = sorted({code.blocks[b].loop for b in bs if code.blocks[b].loop is not None})
        factor, rest = 1, []
        if tree.regions[region].kind == "for" and unroll and loops:
            # The SASS loop with the most copies is the main one; any other is its remainder loop.
            main = max(loops, key=lambda lp: unroll.get(lp, 1))
            factor = unroll.get(main, 1)
            if factor > 1:
                rest = [b for b in bs if code.blocks[b].loop not in (None, main)]
                bs = [b for b in bs if b not in rest]
        ins = [i for b in bs for i in code.block_instructions(b)]
        rem = [i for b in rest for i in code.block_instructions(b)]
        out[region] = RegionCode(len(ins), S.load_depth(ins), sum(S.mma_flops(i.opcode) for i in ins),
                                 sum(S.fma_flops(i.opcode) for i in ins), factor, len(rem), S.load_depth(rem))
    return out


def launch_work(desc: dict, ttgir: str, sass_text: str, num_warps: int, ptx: str | None = None) -> LaunchWork:
    """Per class of programs, what each program of the described launch executes (given its PTX,
    a loop ptxas unrolled runs its SASS trips // unroll times)."""
    tree = control_tree(ttgir, desc["kernel"])
    code = S.parse(sass_text, desc["kernel"])
    assigned, unmapped = assign_blocks(code, tree)
    per_region = region_code(code, tree, assigned, S.unroll_factors(code, ptx) if ptx else None)
    evaluator = Evaluator(tree, desc["args"], tuple(desc["grid"]))
    classes: Counter = Counter()
    for pid in program_ids(desc["grid"]):
        counts = evaluator.program(pid)
        totals = [0, 0, 0, 0, 0, 0, 0]
        for region, rc in per_region.items():
            n, extra = divmod(counts.get(region, 0), rc.unroll)
            instructions = n * rc.instructions + extra * rc.remainder_instructions
            waits = counts.get(region, 0) * -(-rc.loads // rc.unroll)
            if tree.arrival_gated(region):
                totals[5] += instructions
                totals[6] += waits
            totals[0] += instructions
            # Waits, per source trip: ptxas's copies of a trip issue their loads together only as far as
            # registers and the accumulation between them allow; one trip's chain is the bound kept.
            totals[1] += waits
            totals[2] += n * rc.mma_flops
            totals[3] += n * rc.fma_flops
        totals[4] = sum(n for r, n in counts.items() if tree.regions[r].kind == "for")
        classes[tuple(totals)] += 1
    regions = {str(r): {**asdict(rc), "kind": tree.regions[r].kind,
                        "line": list(tree.regions[r].line[-1]) if tree.regions[r].line else None}
               for r, rc in sorted(per_region.items())}
    return LaunchWork(desc["kernel"], tuple(desc["grid"]), num_warps,
                      tuple(ProgramClass(n, *t) for t, n in sorted(classes.items(), key=lambda kv: -kv[1])),
                      regions, unmapped)
