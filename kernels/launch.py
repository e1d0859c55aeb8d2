"""The one place every fastlenet kernel is launched from, and what a launch leaves on record.

Every launch goes through `launch`, so tests can count a step's launches and record each one's grid,
arguments and constexprs, without running it if asked (`record_launches(execute=False)`), as the
`describe` dicts that fastlenet.analysis compiles for GPU targets. Why: docs/design.md, "The launch path".
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import triton

_listeners: list[Callable[["Launch"], None]] = []
_execute = True


@dataclass(frozen=True)
class TensorSpec:
    """What a record keeps of a tensor argument. Never the tensor itself: a live reference to a
    fresh weight gradient would stop autograd from adopting it as .grad (it would copy instead).
    data_ptr_mod16 is what Triton's JIT specialises a pointer on (16-byte alignment). It does not
    depend on the device: CPU and CUDA allocations both start 16-byte aligned, so only a view's
    offset can misalign, and it does so alike on both."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    data_ptr_mod16: int = 0

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        return cls(t.dtype, tuple(t.shape), t.data_ptr() % 16)


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


# @triton.jit picks interpreter or compiler when a kernel is *defined*, from TRITON_INTERPRET at that
# moment, so a kernel defined alongside fastlenet's is asked rather than the environment, which may
# have changed since; the answer cannot change after that.
_INTERPRETING = type(_probe).__name__ == "InterpretedFunction"


def interpreting() -> bool:
    """True when the kernels run in Triton's interpreter."""
    return _INTERPRETING


# Floating-point contraction (a*b+c as one FMA) stated, not left to Triton's default: the kernels
# were built and checked with it on, Triton 3.9 warns on every first compile that its default is
# unset, and 3.10 turns the default off.
FP_FUSION = True


def launch(kernel, grid: tuple[int, ...], args: dict[str, Any], meta: dict[str, Any]) -> None:
    if 0 in grid:
        return  # an empty output: nothing to compute, and a zero-sized grid is an error on CUDA
    if _listeners:
        # Recorded with the option, so the GPU build compiles exactly what runs.
        record = Launch(kernel, grid, {name: TensorSpec.of(v) if isinstance(v, torch.Tensor) else v
                                       for name, v in args.items()}, {**meta, "enable_fp_fusion": FP_FUSION})
        for listener in _listeners:
            listener(record)
    if _execute:
        # Passed as a keyword, not merged into a copy of meta: no dict is built per launch.
        if _INTERPRETING:
            # numpy does the interpreter's arithmetic, masked-off lanes and NaN/Inf inputs included,
            # and would warn the user about lanes no kernel stores; the tests check what is stored.
            with np.errstate(all="ignore"):
                kernel[grid](**args, **meta, enable_fp_fusion=FP_FUSION)
        else:
            kernel[grid](**args, **meta, enable_fp_fusion=FP_FUSION)


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


def executing() -> bool:
    """False inside record_launches(execute=False): kernel outputs are then never written, so host
    code that reads one (a check after a launch) must skip the read."""
    return _execute


@contextlib.contextmanager
def record_launches(execute: bool = True):
    """Collect every Launch made inside the block (in order) into the yielded list.

    execute=False records without running any kernel: outputs stay uninitialised, but every shape,
    grid, argument and constexpr is what a run would launch, since the launch helpers compute them
    from shapes alone. That lets the GPU build test record a batch-65536 training step through the
    interpreter in seconds (torch.empty outputs that nothing writes cost address space, not memory)."""
    launches: list[Launch] = []
    _listeners.append(launches.append)
    try:
        with contextlib.nullcontext() if execute else skip_launches():
            yield launches
    finally:
        _listeners.remove(launches.append)


@contextlib.contextmanager
def skip_launches():
    """Inside the block no kernel runs: every launch helper still validates, allocates, plans and
    assembles its arguments, and listeners (if any) still see each launch, but `kernel[grid](...)`
    is skipped. bench/host_overhead.py times the host's share of a step this way."""
    global _execute
    previous, _execute = _execute, False
    try:
        yield
    finally:
        _execute = previous


_recorded_precision: str | dict[str, str] | None = None
# The kinds of work whose float32 precision PyTorch switches separately (dot_precision's `kind`).
DOT_KINDS = ("conv", "matmul")


def dot_precision(x: torch.Tensor, kind: str) -> str:
    """tl.dot's input_precision for x's dtype: "tf32" or "ieee". float32 follows the switches
    PyTorch itself uses for the same work: convolutions as cuDNN's (TF32 by default), matmuls as
    cuBLAS's (no TF32 by default). The interpreter always computes exactly, except inside
    record_precision(), which records what a GPU run with that precision would launch."""
    if x.dtype != torch.float32:
        return "ieee"
    if _recorded_precision is not None and not _execute:
        return _recorded_precision if isinstance(_recorded_precision, str) else _recorded_precision[kind]
    if interpreting():
        return "ieee"
    return "tf32" if tf32_enabled(kind) else "ieee"


def pytorch_precisions() -> dict[str, str]:
    """What a GPU run would pick for float32 dots right now, by kind: {"conv": ..., "matmul": ...},
    read from PyTorch's switches (tf32_enabled). In a fresh process these are PyTorch's defaults:
    TF32 convolutions, IEEE matmuls."""
    return {kind: "tf32" if tf32_enabled(kind) else "ieee" for kind in DOT_KINDS}


@contextlib.contextmanager
def record_precision(precision: str | dict[str, str]):
    """Inside record_launches(execute=False): float32 dots are launched as `precision` would launch
    them on a GPU, tile sizes included: "ieee" or "tf32" for every dot (the GPU build compiles
    both), or one per kind, {"conv": ..., "matmul": ...} (pytorch_precisions(): a default run)."""
    global _recorded_precision
    previous, _recorded_precision = _recorded_precision, precision
    try:
        yield
    finally:
        _recorded_precision = previous


def tf32_enabled(kind: str) -> bool:
    """Whether PyTorch would use TF32 for a float32 `kind` ("conv" or "matmul") right now.

    Since torch 2.9 the switches are `torch.backends.cudnn.conv.fp32_precision` and
    `torch.backends.cuda.matmul.fp32_precision` ("tf32" / "ieee", or "none": inherit, then the
    legacy switch decides). Once anyone sets precision through that API, reading the legacy
    `cudnn.allow_tf32` or `get_float32_matmul_precision()` may raise, so the new switch is read
    first and the legacy one only where the new API is absent or undecided; never raises."""
    try:
        new = (torch.backends.cudnn.conv if kind == "conv" else torch.backends.cuda.matmul).fp32_precision
    except AttributeError:  # torch < 2.9: only the legacy switches exist
        new = "none"
    if new in ("tf32", "ieee"):
        return new == "tf32"
    try:
        if kind == "conv":
            return bool(torch.backends.cudnn.allow_tf32)
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # the legacy reading refuses a mix of old and new settings
        return False


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate in for inputs of `dtype` (float64 stays float64, for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1). Plain integer math: triton.next_power_of_2 on the
    host goes through JITFunction.__call__, microseconds a call."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers; triton.cdiv on the host costs a JITFunction.__call__ (see next_pow2)."""
    return -(-a // b)


def round_up(x: int, multiple: int) -> int:
    """x rounded up to a multiple of `multiple`."""
    return cdiv(x, multiple) * multiple


class PlanCache(dict):
    """Launch configurations (grids, block sizes, constexpr dicts, plan sizes: plain ints and
    strings, never tensors) keyed by the shapes and settings they are computed from. Strides,
    pointers and PyTorch's precision switches are not in them: the launch helpers read those on
    every call (dot_precision fills DOT_PRECISION into a copy of the cached constexprs). Bounded: a
    program that cycles through many shapes clears it rather than let it grow."""
    MAX_ENTRIES = 256

    def get_or_build(self, key: tuple, build):
        """The entry for key, built as build(*key) on a miss."""
        value = self.get(key)
        if value is None:
            if len(self) >= self.MAX_ENTRIES:
                self.clear()
            value = self[key] = build(*key)
        return value


# --------------------------------------------------------------------------------------------------
# Recorded launch -> description (JSON): what the launch passed, nothing Triton-specific yet. This
# is what the kernels hand the layers above them (fastlenet.analysis compiles and reads these).
# --------------------------------------------------------------------------------------------------

def describe(launch: Launch, origin: str = "") -> dict:
    """A JSON-able description of a recorded Launch: its kernel, grid, arguments (tensors as dtype,
    shape and alignment) and meta-parameters. `origin` says which user-level call launched it."""
    args = {}
    for name, value in launch.args.items():
        if isinstance(value, TensorSpec):
            args[name] = {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                          "data_ptr_mod16": value.data_ptr_mod16}
        elif isinstance(value, (bool, int, float)):
            args[name] = value
        else:
            raise TypeError(f"{launch.name}: unsupported argument {name}={value!r}")
    return {"module": launch.kernel.fn.__module__, "kernel": launch.kernel.fn.__name__,
            "grid": list(launch.grid), "args": args, "meta": dict(launch.meta),
            "origins": [origin] if origin else []}


def record(fn: Callable[[], object], precision: str | dict[str, str]) -> list[Launch]:
    """The Launches fn() makes, recorded without running a kernel, with float32 dots as a GPU run
    with `precision` would launch them (see record_precision): tile sizes may differ by
    precision, so a build that must cover both records both."""
    with record_launches(execute=False) as launches, record_precision(precision):
        try:
            fn()
        except Exception as e:
            raise RuntimeError(
                "recording launches without running their kernels failed: host code read a kernel "
                "output that was never written? Guard such reads with "
                "fastlenet.kernels.launch.executing()") from e
    return launches
