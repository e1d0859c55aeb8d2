"""FLOPs and bytes of a recorded launch, from its description alone (sizes, block sizes, flags).

Each kernel file registers its kernels' formulas here with @accounts(kernel), beside their launch
helper, so a retiling and its accounting change in one diff; fastlenet.analysis.report reads them
through work(desc). Conventions: docs/design.md, "Accounting".
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Job:
    """The programs of a launch that run one tl.dot body."""
    name: str  # "" for a kernel with one job; "dx" / "dw" for a backward's two
    function: str  # the @triton.jit function whose tl.dot does the work (matched in the TTGIR)
    programs: int
    executed: int  # FLOPs its tiles compute, 2 per multiply-add, padding included
    useful: int  # FLOPs of the layer's multiply-adds it computes
    tile: tuple[int, int]  # M x N of the result tile each of its dots computes (checked against the TTGIR)
    dots: int = 1  # tl.dot calls in its body (checked against the TTGIR)


@dataclass(frozen=True)
class Work:
    jobs: tuple[Job, ...]
    reads: dict[str, int]  # pointer argument -> bytes read (each tensor once)
    writes: dict[str, int]  # pointer argument -> bytes written


# (module, kernel name) -> its formulas; filled as each kernel module is imported.
WORK: dict[tuple[str, str], Callable[[dict], Work]] = {}


def accounts(kernel):
    """Register the decorated function as the FLOP/byte formulas of the @triton.jit `kernel`."""
    def register(fn: Callable[[dict], Work]):
        WORK[(kernel.fn.__module__, kernel.fn.__name__)] = fn
        return fn
    return register


def work(desc: dict) -> Work:
    """The Work of a launch description (launch.describe): its kernel's module registers the formulas."""
    importlib.import_module(desc["module"])
    formulas = WORK.get((desc["module"], desc["kernel"]))
    if formulas is None:
        raise KeyError(f"no FLOP/byte formulas for {desc['kernel']}: register them beside its launch helper "
                       f"with @fastlenet.kernels.accounting.accounts({desc['kernel']})")
    return formulas(desc)


def tensor_bytes(desc: dict, *names: str) -> dict[str, int]:
    """Bytes of the named tensor arguments of a launch description."""
    out = {}
    for name in names:
        arg = desc["args"][name]
        out[name] = math.prod(arg["shape"]) * getattr(torch, arg["dtype"]).itemsize
    return out
