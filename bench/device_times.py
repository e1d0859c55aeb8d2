"""Device time of every kernel of one training step (and one forward), per provider, on a CUDA GPU.

    python bench/device_times.py [--batch-sizes 64 256 4096] [--providers fused-graph fused eager eager-graph]
                                 [--json bench/measured/<gpu>-<date>.device-times.json]

The measurement the timing model (python -m fastlenet.analysis.report --predict) is checked against:
for each provider, batch size and mode, the step's time from CUDA events (median of --repeats), and
torch.profiler's device time of each kernel over --profiled steps, in launch order, each fastlenet
kernel labelled with the layer and direction that launched it ("conv2 backward"), as the report
labels its predictions. The JSON records the commit measured (and whether the tree had changes), the
GPU, torch, Triton and CUDA. Needs a CUDA GPU; elsewhere it says so and exits with status 2.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROVIDERS = ("fused-graph", "fused", "eager-graph", "eager")
MODES = ("train", "inference")
# The fused step's Triton launches in order (fastlenet.profiling.step_launches' labels): LeNet-5's
# layers forward, the loss forward and backward, the layers backward in reverse.
LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")


def launch_labels(mode: str) -> list[str]:
    forward = [f"{n} forward" for n in LAYERS]
    if mode == "inference":
        return forward
    backward = []
    for n in reversed(LAYERS):
        if n.startswith("conv") and n != LAYERS[0]:  # its input needs a gradient: dz, then grad-input, first
            backward += [f"{n} backward dz", f"{n} backward dx"]
        backward.append(f"{n} backward")
    return forward + ["loss forward", "loss backward"] + backward


def _kernel_of(label: str) -> str:
    """The fastlenet kernel a launch label's layer and direction run ("conv2 backward" ->
    conv2d_act_pool_bwd_kernel, "conv2 backward dz" -> conv2d_act_pool_dz_kernel, "conv2 backward dx"
    -> conv2d_act_pool_dx_kernel)."""
    layer, direction, *part = label.split()
    family = {"conv": "conv2d_act_pool", "fc": "linear_act", "loss": "cross_entropy"}[layer.rstrip("0123456789")]
    return f"{family}_{part[0] if part else 'fwd' if direction == 'forward' else 'bwd'}_kernel"


def label_kernels(names: list[str], mode: str) -> list[str | None]:
    """The label of each kernel of one step, in launch order: fastlenet's Triton kernels (names ending
    _fwd_kernel / _dz_kernel / _dx_kernel / _bwd_kernel) take the step's labels in order; any other
    kernel (ATen's, cuDNN's) has none. Refuses a sequence whose Triton kernels are not the step's."""
    labels = iter(launch_labels(mode))
    out = []
    for name in names:
        if name.endswith(("_fwd_kernel", "_dz_kernel", "_dx_kernel", "_bwd_kernel")):
            label = next(labels, None)
            if label is None or name != _kernel_of(label):
                raise ValueError(f"kernel {name} where the step launches {label or 'nothing more'}")
            out.append(label)
        else:
            out.append(None)
    if next(labels, None) is not None:
        raise ValueError(f"the step launched {sum(lbl is not None for lbl in out)} of its "
                         f"{len(launch_labels(mode))} Triton kernels")
    return out


def per_step_kernels(events: list[tuple[str, float]], steps: int, mode: str, fastlenet: bool) -> list[dict]:
    """[(kernel name, device µs)] of `steps` identical steps in order -> one step's kernels, each with
    its mean time over the steps and (fastlenet providers) its label."""
    if len(events) % steps:
        raise ValueError(f"{len(events)} kernels over {steps} steps: the steps launched different kernels")
    n = len(events) // steps
    names = [name for name, _ in events[:n]]
    for s in range(1, steps):
        if [name for name, _ in events[s * n:(s + 1) * n]] != names:
            raise ValueError("the profiled steps launched different kernels")
    labels = label_kernels(names, mode) if fastlenet else [None] * n
    return [{"kernel": name, "label": label,
             "device_us": statistics.fmean(events[s * n + i][1] for s in range(steps))}
            for i, (name, label) in enumerate(zip(names, labels))]


def commit() -> dict:
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or None, "tree_changed": bool(git("status", "--porcelain"))}


def measure(provider: str, batch: int, mode: str, repeats: int, profiled: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import throughput  # bench/throughput.py: the same providers, built the same way

    device = torch.device("cuda")
    torch.manual_seed(0)
    init = throughput.build_model("lenet5").state_dict()
    model, optimizer, loss_fn = throughput.build(provider, "lenet5", init, device)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    step = throughput.step_function(provider, model, optimizer, loss_fn, x, y, mode)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    seconds = throughput.time_steps(step, device, repeats)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(profiled):
            step()
        torch.cuda.synchronize()
    events = [(e.name, e.device_time) for e in sorted(prof.events(), key=lambda e: e.time_range.start)
              if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
    kernels = per_step_kernels(events, profiled, mode, provider.startswith("fused"))
    return {"provider": provider, "batch_size": batch, "mode": mode, "median_step_ms": statistics.median(seconds) * 1e3,
            "kernels_per_step": len(kernels), "kernel_us_sum": sum(k["device_us"] for k in kernels), "kernels": kernels}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 4096])
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--repeats", type=int, default=30, help="timed steps (CUDA events) per row")
    p.add_argument("--profiled", type=int, default=5, help="profiled steps per row")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: bench/device_times.py measures kernels on a CUDA GPU, and this machine has none",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "bench"))
    torch.backends.cudnn.benchmark = True
    rows = []
    for provider in args.providers:
        for mode in args.modes:
            for batch in args.batch_sizes:
                row = measure(provider, batch, mode, args.repeats, args.profiled)
                rows.append(row)
                print(f"{provider:>11} {mode:>9} batch {batch:>5}: step {row['median_step_ms'] * 1e3:9.1f} us, "
                      f"{row['kernels_per_step']} kernels, {row['kernel_us_sum']:9.1f} us of kernels", flush=True)
                for k in row["kernels"]:
                    print(f"    {k['label'] or '':<16} {k['kernel'][:60]:<60} {k['device_us']:9.1f} us")
    import triton

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = {**commit(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "date": now,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "timer": "step: CUDA events, median; kernels: torch.profiler device time, mean over the profiled steps"}
    if args.json:
        from fastlenet.files import write_json

        write_json(args.json, {"meta": meta, "results": rows})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
