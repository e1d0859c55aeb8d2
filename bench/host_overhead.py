"""Host overhead of one LeNet-5 training step: what fastlenet's Python costs, with no kernel run.

    TRITON_INTERPRET=1 python bench/host_overhead.py                    # batch 256, CPU, no GPU needed
    TRITON_INTERPRET=1 python bench/host_overhead.py --adam --json out.json

At LeNet's size a GPU training step is bound by host work, not by the device. This bench times the
fused training step (fastlenet.engine.training_step, the step fastlenet.train runs, of
LeNet5(fused=True) with fastlenet.functional.cross_entropy: forward, loss, backward; with --adam
also an Adam(fused=True) step) on CPU tensors with every Triton launch replaced by a no-op
(fastlenet.kernels.launch.skip_launches): what remains is validation, autograd, output and workspace
allocation, planning and launch-argument assembly, i.e. everything fastlenet's host code does.

LEFT OUT, and to be added for a real GPU step: Triton's own launcher (argument binding, cache
lookup, driver call; about 10 us per launch in current Triton releases) and all device time. CPU
allocation (torch.empty on the CPU) stands in for the CUDA caching allocator.

The yardstick, measured in the same run: the eager reference step (LeNet5(fused=False),
F.cross_entropy, backward; with --adam Adam(fused=True)) on the CPU, twice: at one image, where
PyTorch's dispatch and autograd dominate and its CPU compute is small (the nearest CPU stand-in for
eager's host work; on a GPU it would add ~5 us of CUDA launch per op), and at the bench's batch,
where CPU compute dominates (for scale only; it is no host-overhead figure). The "meta" device would
compute nothing, but its conv meta-functions are Python and cost more than the CPU's compute.

Also measured: PyTorch's floor, the same step through a shell of LeNet5(fused=True)'s autograd
graph (five layers and a loss as autograd Functions that only allocate their outputs and
gradients): module calls, Function.apply and backward, saved tensors, gradient accumulation. The
fused step minus the floor is fastlenet's own host work (validation, planning, workspaces and
counters, launch arguments), the part this library can cut.

Each step is timed alone with time.perf_counter after warm-up steps, garbage collection off;
reported: the median, the 10th..90th percentile range, and for the fused step the median per launch
(launches counted through fastlenet.kernels.launch's listeners). The machine's other load shows in
the spread; compare runs made back to back on the same machine.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels on the CPU

import argparse
import datetime
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton

from fastlenet import engine
from fastlenet.files import write_json
from fastlenet.kernels import launch as _launch
from fastlenet.models import LeNet5

LEFT_OUT = ("Triton's own launcher (~10 us per launch in current Triton releases) and all device "
            "time; CPU allocation stands in for the CUDA caching allocator")


def _adam(model: torch.nn.Module, adam: bool):
    """Adam(fused=True) over the model's parameters, or None (no update) without --adam."""
    return engine.build_optimizer(model, engine.OptimizerSettings("adam", 1e-3, 0.0, 0.0)) if adam else None


def _step_fn(fused: bool, batch: int, adam: bool):
    """engine.training_step of LeNet5(fused=fused), fastlenet.train's step, on a fixed CPU batch."""
    torch.manual_seed(0)
    model = LeNet5(fused=fused)
    x = torch.randn(batch, 1, 28, 28)
    target = torch.randint(0, 10, (batch,))
    loss_fn, opt = engine.loss_function(fused), _adam(model, adam)
    return lambda: engine.training_step(model, opt, loss_fn, x, target)


class _Shell(torch.autograd.Function):
    """An op with fastlenet's autograd shape and none of its work: forward allocates the output
    and saves what fastlenet saves (input, weight, output); backward allocates the gradients."""
    @staticmethod
    def forward(ctx, x, weight, bias, out_shape):
        y = torch.empty(out_shape(x.shape), dtype=x.dtype, device=x.device)
        ctx.save_for_backward(x, weight, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, _ = ctx.saved_tensors
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        return dx, torch.empty_like(weight), torch.empty(weight.shape[0], dtype=x.dtype), None


class _ShellLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target):
        ctx.save_for_backward(logits, target)
        return torch.empty((), dtype=logits.dtype, device=logits.device)

    @staticmethod
    def backward(ctx, grad):
        logits, _ = ctx.saved_tensors
        return torch.empty_like(logits), None


class _ShellLayer(torch.nn.Module):
    def __init__(self, weight_shape, out_shape):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(weight_shape) * 0.1)
        self.bias = torch.nn.Parameter(torch.zeros(weight_shape[0]))
        self.out_shape = out_shape

    def forward(self, x):
        return _Shell.apply(x, self.weight, self.bias, self.out_shape)


class _ShellLeNet5(torch.nn.Module):
    """LeNet5(fused=True)'s structure (five layers, flatten, a loss: six autograd nodes of fastlenet's
    kind), each op a _Shell. Its step is PyTorch's floor for any custom-kernel LeNet-5: module calls,
    autograd Function apply/backward, saved tensors, gradient accumulation, output allocation."""
    def __init__(self):
        super().__init__()
        self.conv1 = _ShellLayer((6, 1, 5, 5), lambda s: (s[0], 6, 14, 14))
        self.conv2 = _ShellLayer((16, 6, 5, 5), lambda s: (s[0], 16, 5, 5))
        self.fc1 = _ShellLayer((120, 400), lambda s: (s[0], 120))
        self.fc2 = _ShellLayer((84, 120), lambda s: (s[0], 84))
        self.fc3 = _ShellLayer((10, 84), lambda s: (s[0], 10))

    def forward(self, x):
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28):  # as LeNet5.forward
            raise ValueError("bad input")
        x = self.conv2(self.conv1(x)).flatten(1)
        return self.fc3(self.fc2(self.fc1(x)))


def _floor_step_fn(batch: int, adam: bool):
    """The same engine.training_step through _ShellLeNet5 and _ShellLoss."""
    torch.manual_seed(0)
    model = _ShellLeNet5()
    x = torch.randn(batch, 1, 28, 28)
    target = torch.randint(0, 10, (batch,))
    # The same optimizer as the fused step: Adam is PyTorch's work, not fastlenet's.
    opt = _adam(model, adam)
    return lambda: engine.training_step(model, opt, _ShellLoss.apply, x, target)


BLOCK = 20


def _time(steps: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Per-step times (us) of each step function, run round-robin in blocks of BLOCK steps, so a
    change in the machine's load falls on all of them alike, while within a block each runs with
    its own code and data in the caches (as in a training loop)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    gc.collect()
    gc.disable()
    try:
        for start in range(0, repeats, BLOCK):
            for name, step in steps.items():
                step()  # re-warm after the other steps
                for _ in range(min(BLOCK, repeats - start)):
                    t0 = time.perf_counter()
                    step()
                    times[name].append((time.perf_counter() - t0) * 1e6)
    finally:
        gc.enable()
    return times


def _summary(times: list[float], launches: int | None) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    median = statistics.median(times)
    out = {"us_per_step_median": round(median, 2), "us_per_step_p10": round(q[0], 2),
           "us_per_step_p90": round(q[-1], 2), "repeats": len(times)}
    if launches:
        out["launches_per_step"] = launches
        out["us_per_launch_median"] = round(median / launches, 2)
    return out


def run(batch: int = 256, repeats: int = 300, warmup: int = 30, adam: bool = False) -> dict:
    if not _launch.interpreting():
        raise SystemExit("bench/host_overhead.py runs under TRITON_INTERPRET=1 (set it before Python starts)")
    # One thread: host work is single-threaded anyway, and an idle intra-op pool woken by the eager
    # step's small ops made its timings swing by orders of magnitude on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(batch, repeats, warmup, adam)
    finally:
        torch.set_num_threads(threads)


def _run(batch: int, repeats: int, warmup: int, adam: bool) -> dict:
    fused_step = _step_fn(True, batch, adam)
    eager_1 = _step_fn(False, 1, adam)
    eager_b = _step_fn(False, batch, adam)
    with _launch.skip_launches():
        with _launch.record_launches(execute=False) as launches:
            fused_step()  # also the first warm-up step
        times = _time({"fused": fused_step, "floor": _floor_step_fn(batch, adam), "eager_1": eager_1},
                      repeats, warmup)
    fused_times, floor_times, eager_1_times = times["fused"], times["floor"], times["eager_1"]
    eager_b_times = _time({"eager": eager_b}, max(repeats // 5, 1), max(warmup // 5, 1))["eager"]
    return {
        "bench": "host_overhead",
        "batch": batch, "adam": adam,
        "fused": _summary(fused_times, len(launches)),
        # PyTorch's floor under any custom-kernel LeNet-5 step (see _ShellLeNet5), and the rest:
        # what fastlenet itself adds (validation, planning, allocation of workspaces, arguments).
        "pytorch_floor": _summary(floor_times, None),
        "fastlenet_own_us_per_step": round(statistics.median(fused_times) - statistics.median(floor_times), 2),
        "eager_cpu_batch1": _summary(eager_1_times, None),
        "eager_cpu": _summary(eager_b_times, None),
        "left_out": LEFT_OUT,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": 1},
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Runs on a CPU under TRITON_INTERPRET=1. NOT included: "
        + LEFT_OUT + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=300, help="timed steps per path (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first (default 30)")
    parser.add_argument("--adam", action="store_true",
                        help="include an Adam(fused=True) step (in the floor and eager steps too)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    res = run(args.batch, args.repeats, args.warmup, args.adam)
    f, e, c = res["fused"], res["eager_cpu_batch1"], res["eager_cpu"]
    print(f"host work per training step, batch {args.batch}{' + Adam' if args.adam else ''} "
          f"(median, p10..p90 over {args.repeats} steps):")
    print(f"  fused (fastlenet, launches skipped): {f['us_per_step_median']:9.1f} us  "
          f"({f['us_per_step_p10']:.1f}..{f['us_per_step_p90']:.1f})  {f['launches_per_step']} launches, "
          f"{f['us_per_launch_median']:.1f} us per launch")
    fl = res["pytorch_floor"]
    print(f"  PyTorch floor (same autograd graph, ops that only allocate): {fl['us_per_step_median']:.1f} us  "
          f"({fl['us_per_step_p10']:.1f}..{fl['us_per_step_p90']:.1f}) -> fastlenet's own work "
          f"{res['fastlenet_own_us_per_step']:.1f} us per step")
    print(f"  eager reference, CPU, 1 image      : {e['us_per_step_median']:9.1f} us  "
          f"({e['us_per_step_p10']:.1f}..{e['us_per_step_p90']:.1f})  (host-dominated yardstick)")
    print(f"  eager reference, CPU, batch {args.batch:<6}: {c['us_per_step_median']:9.1f} us  "
          f"({c['us_per_step_p10']:.1f}..{c['us_per_step_p90']:.1f})  (CPU compute included; scale only)")
    print(f"  NOT included: {LEFT_OUT}.")
    if args.json:
        write_json(args.json, res)
        print(f"  wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
