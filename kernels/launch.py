"""The one place every fastlenet kernel is launched from.

Routing every launch through `launch` gives the tests and the benchmark two things without touching
the kernels: a count of launches per training step, and a record of each launch's signature and
constexprs, which tests/test_gpu_build.py compiles for real GPU targets with ptxas.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import triton

_listeners: list[Callable[["Launch"], None]] = []


@dataclass(frozen=True)
class TensorSpec:
    """What a record keeps of a tensor argument. Never the tensor itself: a live reference to a
    fresh weight gradient would stop autograd from adopting it as .grad (it would copy instead)."""
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class Launch:
    kernel: Any  # the @triton.jit function
    grid: tuple[int, ...]
    args: dict[str, Any]  # runtime arguments, by name; tensors as TensorSpec
    meta: dict[str, Any]  # tl.constexpr arguments and launch options (num_warps, num_stages)
    name: str = field(init=False)

    def __post_init__(self):
        self.name = self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else str(self.kernel)


@triton.jit
def _probe():
    pass


def interpreting() -> bool:
    """True when the kernels run in Triton's interpreter. @triton.jit picks interpreter or compiler
    when a kernel is *defined*, from TRITON_INTERPRET at that moment, so this asks a kernel defined
    alongside fastlenet's rather than the environment, which may have changed since."""
    return type(_probe).__name__ == "InterpretedFunction"


def launch(kernel, grid: tuple[int, ...], args: dict[str, Any], meta: dict[str, Any]) -> None:
    if 0 in grid:
        return  # an empty output: nothing to compute, and a zero-sized grid is an error on CUDA
    if _listeners:
        record = Launch(kernel, grid, {name: TensorSpec(v.dtype, tuple(v.shape)) if isinstance(v, torch.Tensor)
                                       else v for name, v in args.items()}, meta)
        for listener in _listeners:
            listener(record)
    kernel[grid](**args, **meta)


_poison = False


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a kernel output. Inside `poison_outputs()` it is filled with NaN (floats) or 127
    (ints, never a valid window index), so an element a kernel forgets to write fails the tests."""
    if _poison:
        fill = float("nan") if dtype.is_floating_point else 127
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def poison_outputs():
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


@contextlib.contextmanager
def record_launches():
    """Collect every Launch made inside the block (in order) into the yielded list."""
    launches: list[Launch] = []
    _listeners.append(launches.append)
    try:
        yield launches
    finally:
        _listeners.remove(launches.append)


def dot_precision(x: torch.Tensor, kind: str) -> str:
    """tl.dot's input_precision for x's dtype. float32 follows the switches PyTorch itself uses:
    cudnn.allow_tf32 for convolutions (on by default), the float32 matmul precision for matmuls
    ("highest", i.e. no TF32, by default). The interpreter always computes exactly."""
    if x.dtype != torch.float32 or interpreting():
        return "ieee"
    if kind == "conv":
        tf32 = torch.backends.cudnn.allow_tf32
    else:
        tf32 = torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate in for inputs of `dtype` (float64 stays float64, for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
