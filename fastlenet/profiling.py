"""Counting what a training step asks of the device, and how much arithmetic it is.

count_device_ops(fn) runs fn once and counts the operations it would put on a device: every Triton
launch (seen through fastlenet.kernels.launch.record_launches) plus every ATen *compute* op (seen by a
TorchDispatchMode; fastlenet's custom ops are counted by their launches, not as ops). It works on
any device, so the CPU tests can check the fused path's budget through Triton's interpreter.
model_flops(model) is the arithmetic of one image through the model, computed from the layer shapes,
which the benchmark sets against the device's peak.
step_launches(variant, batch) records the Triton launches of one fused training step
(fastlenet.engine.training_step) without running them, labelled by layer, for the static report of
the compiled kernels (fastlenet.analysis.report).
"""
from __future__ import annotations

import copy
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCount", "count_device_ops", "model_flops", "step_launches", "NOT_COUNTED"]

# ATen ops that compute nothing: allocation, views and other metadata, autograd bookkeeping and
# profiler markers. lift_fresh wraps a Python constant as a tensor; _local_scalar_dense is
# .item(), a read of a scalar to the host (in foreach Adam: of the CPU-resident step counters).
NOT_COUNTED = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "set_", "resize_",
    "view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "detach", "alias", "expand",
    "permute", "squeeze", "unsqueeze", "slice", "select", "flatten", "lift_fresh", "_local_scalar_dense",
    "_record_function_enter_new", "_record_function_exit",
})


@dataclass
class OpCount:
    """Device operations of one call: Triton launches (kernel names) and ATen compute ops
    ("name" or "name.overload"), each in the order they ran."""
    triton_launches: list[str] = field(default_factory=list)
    aten_ops: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.triton_launches) + len(self.aten_ops)

    def breakdown(self) -> str:
        """One line, e.g. '16 = 13 Triton (linear_act_fwd_kernel x3, ...) + 3 ATen (ones_like, ...)'."""
        def summary(names: list[str]) -> str:
            return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in Counter(names).items())
        return (f"{self.total} = {len(self.triton_launches)} Triton ({summary(self.triton_launches)}) "
                f"+ {len(self.aten_ops)} ATen ({summary(self.aten_ops)})")


def _launch_code():
    from fastlenet.kernels import launch

    return launch.launch.__code__


def _inside(code, frame) -> bool:
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


class _AtenOps(TorchDispatchMode):
    def __init__(self, ops: list[str], launch_code):
        super().__init__()
        self.ops, self.launch_code = ops, launch_code

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # fastlenet's own ops (fastlenet.ops) are counted by the Triton launches they make.
        if func.namespace == "fastlenet":
            return func(*args, **(kwargs or {}))
        # Under TRITON_INTERPRET=1 the interpreter copies a kernel's arguments with ATen ops; they
        # are part of the Triton launch, already counted once, so nothing inside launch() counts.
        if name not in NOT_COUNTED and not (self.launch_code and _inside(self.launch_code, sys._getframe(1))):
            self.ops.append(name if func._overloadname == "default" else f"{name}.{func._overloadname}")
        return func(*args, **(kwargs or {}))


def count_device_ops(fn: Callable[[], object], *, warmup: int = 1) -> OpCount:
    """Call fn `warmup` times uncounted (first calls allocate optimizer state and lazily created
    buffers), then once more, counting every Triton launch and every ATen compute op it makes.

    Counted: every ATen op that reads or writes tensor data, including the fill that seeds
    loss.backward() (ones_like), copies, zeroing, the optimizer's step-counter increment and
    _fused_adam_. Not counted (NOT_COUNTED): allocation (empty, empty_strided, empty_like, ...),
    views and metadata (view, _unsafe_view, reshape, as_strided, t, transpose, detach, alias,
    expand, permute, squeeze, unsqueeze, slice, select), lift_fresh, .item() reads
    (_local_scalar_dense) and profiler markers. One ATen op is one dispatcher call, which may be
    more than one GPU kernel (cuDNN's convolution backward, for one) or, for foreach Adam's
    step-counter increment, work on host-resident tensors. Inductor's generated kernels never
    reach the dispatcher, so a torch.compile'd function cannot be counted this way.
    """
    for _ in range(warmup):
        fn()
    count = OpCount()
    from fastlenet.kernels.launch import record_launches

    with record_launches() as launches, _AtenOps(count.aten_ops, _launch_code()):
        fn()
    count.triton_launches = [launch.name for launch in launches]
    return count


def step_launches(variant: str = "lenet5", batch: int = 256, precision: str | dict[str, str] | None = None,
                  device="cpu", mode: str = "train") -> list[dict]:
    """The Triton launches of one fused LeNet-5 training_step (SGD), recorded without running a
    kernel, as launch.describe dicts whose one origin says which layer and direction launched it:
    "conv1 forward", ..., "loss forward", "loss backward", "fc3 backward", ..., "conv2 backward dz",
    "conv2 backward dx", "conv2 backward", "conv1 backward".
    mode="inference": those of one forward call under torch.inference_mode instead.

    precision: float32 dots as launch.record_precision takes it; None reads PyTorch's switches as a
    GPU run would (launch.pytorch_precisions: TF32 convolutions, IEEE matmuls unless changed). On
    the CPU this needs the interpreter (TRITON_INTERPRET=1): the fused layers refuse CPU tensors
    otherwise. The optimizer's ATen op is part of the step but launches no Triton kernel."""
    from fastlenet import functional as FF
    from fastlenet.engine import training_step
    from fastlenet.kernels.launch import describe, pytorch_precisions, record
    from fastlenet.models import LeNet5

    model = LeNet5(variant, fused=True).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.empty(batch, 1, 28, 28, device=device)
    y = torch.zeros(batch, dtype=torch.int64, device=device)
    precision = pytorch_precisions() if precision is None else precision
    if mode == "inference":
        def forward():
            with torch.inference_mode():
                model(x)
        launches = record(forward, precision)
        expected = [(f"{n} forward", "_fwd_kernel") for n, _ in model.named_children()]
    elif mode == "train":
        launches = record(lambda: training_step(model, optimizer, FF.cross_entropy, x, y), precision)
        # One launch per layer and direction, forward in layer order, backward in reverse; a
        # convolution that passes its gradient on gathers dz and computes grad-input in two launches
        # before its parameters' gradients.
        layers = [name for name, _ in model.named_children()] + ["loss"]
        expected = [(f"{n} forward", "_fwd_kernel") for n in layers]
        for n in reversed(layers):
            if len(expected) < len(launches) and launches[len(expected)].name.endswith("_dz_kernel"):
                expected += [(f"{n} backward dz", "_dz_kernel"), (f"{n} backward dx", "_dx_kernel")]
            expected.append((f"{n} backward", "_bwd_kernel"))
    else:
        raise ValueError(f"mode must be 'train' or 'inference', not {mode!r}")
    if len(launches) != len(expected) or any(
            not launch.name.endswith(suffix) for launch, (_, suffix) in zip(launches, expected)):
        raise RuntimeError(f"a {variant} training step launched {[launch.name for launch in launches]}; "
                           f"expected one forward launch per layer and the loss, then their backward "
                           f"launches in reverse (a convolution's dz and grad-input launches before its "
                           f"backward)")
    return [describe(launch, label) for launch, (label, _) in zip(launches, expected)]


def model_flops(model: nn.Module, input_shape=(1, 28, 28)) -> dict[str, int]:
    """Floating-point operations for one image, from the shapes of the model's conv and linear layers.

    Convention: 2 FLOPs per multiply-accumulate of the convolutions and matrix products only (bias,
    activation, pooling, loss and optimizer are left out: well under 1% here). Backward computes,
    for every layer, the weight gradient (as many MACs as the forward) and the input gradient (as
    many again) except for the first layer, whose input needs no gradient. Returns forward,
    backward and train (= forward + backward) FLOPs per image.
    """
    macs: list[int] = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs.append(output.numel() * k)
        elif isinstance(module, nn.Linear):
            macs.append(output.numel() * module.in_features)

    # A shape-only twin on the meta device: no arithmetic, no weights touched, any model class.
    twin = _meta_twin(model)
    handles = [m.register_forward_hook(hook) for m in twin.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            twin(torch.empty((1, *input_shape), device="meta"))
    finally:
        for h in handles:
            h.remove()
    forward = 2 * sum(macs)
    backward = 2 * forward - (2 * macs[0] if macs else 0)
    return {"forward": forward, "backward": backward, "train": forward + backward}


def _meta_twin(model: nn.Module) -> nn.Module:
    """The model on the meta device; for a fastlenet LeNet5 its reference twin, because the fused
    layers' kernels cannot run on meta tensors (their shapes are the same)."""
    from fastlenet.models import LeNet5

    if isinstance(model, LeNet5):
        with torch.device("meta"):
            return LeNet5(model.variant, fused=False)
    return copy.deepcopy(model).to("meta")
