"""Training and inference throughput of LeNet-5 (or a tutorial network, --model): eager vs
torch.compile vs fused Triton vs CUDA graph.

    python bench/throughput.py                                  # every provider, default batch sizes
    python bench/throughput.py --json bench/results/h100.json --plot bench/results/h100.png
    python bench/throughput.py --time-to-accuracy 0.99          # wall-clock to 99% test accuracy

Providers (same network, same initial weights, float32, Adam(fused=True) throughout):
  eager          the reference model: torch.nn layers, F.cross_entropy (cuDNN/cuBLAS on a GPU)
  eager-graph    the reference step (forward, loss, backward, Adam(capturable=True) step) captured
                 once in a CUDA graph and replayed, as fused-graph is; GPU only
  compile        the reference model under torch.compile (Inductor, default mode); loss and Adam eager
  compile-graph  torch.compile(mode="reduce-overhead"): Inductor's kernels replayed as CUDA graphs;
                 GPU only (on a CPU Inductor would skip the graphs and run the default mode)
  compile-tuned  torch.compile(mode="max-autotune-no-cudagraphs"): Inductor benchmarks its kernel
                 choices (minutes of compiling on a GPU)
  fused          fastlenet's fused Triton layers (for a tutorial network: fastlenet.fuse of the
                 reference) and Triton cross-entropy
  fused-graph    the whole fused training step captured once in a CUDA graph and replayed; GPU only

For each provider, batch size and mode ("train": zero_grad, forward, loss, backward, optimizer step;
"inference": forward only, under torch.inference_mode), on a fixed random batch already on the
device: warm-up calls first (the first call, which compiles, is timed and reported separately), then
--repeats timed steps, each bracketed by CUDA events on a GPU (time.perf_counter on the CPU, where
the ops run synchronously). Reported: median images/s and the 20th..80th percentile range, device
operations per step (fastlenet.profiling.count_device_ops), FLOPs per image (2 per multiply-add of
the conv and linear layers; training = forward + weight gradients + input gradients except conv1's),
and the achieved fraction of the device's peak where the device is in PEAK_TFLOPS. The report ends
with one line: the fastest provider at each batch size and by how much. (Per-launch floors are not
measured here: python -m fastlenet.analysis.report derives them from the compiled kernels.)

Without a CUDA GPU, fused and fused-graph are listed as unavailable with the reason; nothing is
estimated. Under TRITON_INTERPRET=1 a couple of fused steps run through Triton's CPU interpreter at
a tiny batch, labelled "interpreter": true, to count their operations; their time is no speed figure.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from fastlenet import engine
from fastlenet.cli import DEVICE_CHOICES, CLIError, HelpFormatter, choose_device
from fastlenet.files import write_json
from fastlenet.models import build_model
from fastlenet.names import DATASET_NAMES, DEFAULT_DATA_DIR, MODEL_NAMES
from fastlenet.plots import new_figure, save_figure
from fastlenet.profiling import count_device_ops, model_flops

PROVIDERS = ("eager", "eager-graph", "compile", "compile-graph", "compile-tuned", "fused", "fused-graph")
# torch.compile's mode per compile provider (None: its default), kept in each result row.
COMPILE_MODES = {"compile": None, "compile-graph": "reduce-overhead", "compile-tuned": "max-autotune-no-cudagraphs"}
# The providers fastlenet's own are set against: the ways PyTorch runs the same network.
PYTORCH_PROVIDERS = ("eager", "eager-graph", "compile", "compile-graph", "compile-tuned")
# Providers replaying CUDA graphs: GPU only.
GRAPH_PROVIDERS = ("eager-graph", "compile-graph", "fused-graph")
MODES = ("train", "inference")
INTERPRETER_BATCH = 4  # batch of the interpreter's fused check: a few images, a few seconds per step

# Peak dense (no sparsity) throughput in TFLOP/s from NVIDIA's datasheets, as (FP32, TF32 tensor
# core). The first entry whose key occurs in torch.cuda.get_device_name() applies, so the more
# specific names come first. A device not listed gets no fraction of peak, and the report says why.
PEAK_TFLOPS = (
    ("H200 NVL", 60.0, 417.5),
    ("H200", 67.0, 494.7),       # SXM
    ("H100 NVL", 60.0, 417.5),
    ("H100 PCIe", 51.2, 378.0),
    ("H100", 67.0, 494.7),       # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 19.5, 156.0),       # SXM4 and PCIe alike
)


class Unavailable(Exception):
    """A provider cannot run here; the message says why."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS),
                   help="providers to measure, in this order")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128, 256, 512, 1024, 4096])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--repeats", type=int, default=50, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before timing (the first "
                   "call, which compiles, is timed separately)")
    p.add_argument("--cpu-threads", type=int, help="torch.set_num_threads on the CPU "
                   "(default: PyTorch's choice)")
    p.add_argument("--model", "--variant", dest="variant", choices=MODEL_NAMES, default="lenet5",
                   help="the network: a LeNet-5 variant or a tutorial network (see fastlenet.models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", "--dtype", dest="amp", choices=("off", "fp16", "bf16"), default="off",
                   help="automatic mixed precision for every provider: forward and loss under torch.autocast "
                        "in float16 (training with a GradScaler) or bfloat16, float32 weights")
    p.add_argument("--json", type=Path, metavar="PATH", help="write machine-readable results here")
    p.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of throughput vs batch size")
    tta = p.add_argument_group("time to accuracy (instead of the throughput sweep)")
    tta.add_argument("--time-to-accuracy", type=float, metavar="ACC",
                     help="train eager and fused from the same seed until the test accuracy reaches "
                          "ACC (e.g. 0.99) and report the wall-clock seconds of each")
    tta.add_argument("--tta-batch-size", type=int, default=128)
    tta.add_argument("--tta-lr", type=float, default=2e-3)
    tta.add_argument("--tta-max-epochs", type=int, default=20)
    tta.add_argument("--dataset", choices=DATASET_NAMES, default="mnist")
    tta.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        p.error("--repeats and --batch-sizes must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------------------------------
# Devices and what they are
# --------------------------------------------------------------------------------------------------

def interpreting() -> bool:
    from fastlenet.kernels.launch import interpreting as triton_interpreting

    return triton_interpreting()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def peak_tflops(device: torch.device) -> dict | None:
    """{'fp32': ..., 'tf32': ...} TFLOP/s for a GPU in PEAK_TFLOPS, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, fp32, tf32 in PEAK_TFLOPS:
        if key in name:
            return {"fp32": fp32, "tf32": tf32, "matched": key}
    return None


def metadata(args, device: torch.device, flops: dict) -> dict:
    import triton

    meta = {
        "device": str(device),
        "device_name": device_name(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "triton_interpret": interpreting(),
        "variant": args.variant,
        "amp": args.amp,
        "flops_per_image": flops,
        "flops_convention": "2 per multiply-add of conv/linear layers; train = forward + weight "
                            "gradients + input gradients (none for conv1); bias, activation, "
                            "pooling, loss and optimizer not counted",
        "peak_tflops": peak_tflops(device),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "timer": "cuda events per step" if device.type == "cuda" else "time.perf_counter per step",
    }
    if device.type == "cuda":
        meta["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        meta["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        meta["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return meta


# --------------------------------------------------------------------------------------------------
# Providers: each builds a step function for (batch size, mode) or raises Unavailable
# --------------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fused_unavailable(device: torch.device) -> str | None:
    if device.type == "cuda" or interpreting():
        return None
    return ("the fused Triton kernels need a CUDA GPU; TRITON_INTERPRET=1 runs them on the CPU "
            "through Triton's interpreter, for checking, not for speed")


def adam(lr: float) -> engine.OptimizerSettings:
    """Every provider's optimizer: Adam(fused=True), torch's betas, no weight decay."""
    return engine.OptimizerSettings("adam", lr, momentum=0.0, weight_decay=0.0)


def build(provider: str, variant: str, init: dict, device: torch.device, lr: float = 1e-3):
    """(model, optimizer, loss_fn) for the provider, weights from `init`, on `device`."""
    fused = provider in ("fused", "fused-graph")
    if fused and (why := fused_unavailable(device)):
        raise Unavailable(why)
    if provider in GRAPH_PROVIDERS and device.type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA GPU")
    model = build_model(variant, fused=fused).to(device)
    model.load_state_dict(init)
    # capturable keeps Adam's step counters on the device, which a CUDA graph requires.
    optimizer = engine.build_optimizer(model, adam(lr), capturable=provider in ("eager-graph", "fused-graph"))
    loss_fn = engine.loss_function(fused, variant)
    if provider in COMPILE_MODES:
        from torch import _dynamo

        _dynamo.reset()  # a fresh cache per measurement: never hit the recompile limit
        if hasattr(_dynamo.config, "fail_on_recompile_limit_hit"):
            _dynamo.config.fail_on_recompile_limit_hit = True  # never fall back to eager silently
        model = torch.compile(model, dynamic=False, mode=COMPILE_MODES[provider])
    return model, optimizer, loss_fn


def amp_unavailable(provider: str, amp: str, device: torch.device) -> str | None:
    if amp == "bf16" and provider in ("fused", "fused-graph") and device.type != "cuda":
        return "bfloat16 fused layers need a CUDA GPU: Triton's interpreter computes bfloat16 dot products wrongly"
    if amp == "fp16" and provider == "fused-graph":
        return "--amp fp16 trains with a GradScaler, whose step is not captured in a CUDA graph"
    return None


def step_function(provider, model, optimizer, loss_fn, x, y, mode, amp: str = "off"):
    mixed = engine.Amp.of(amp, x.device.type)
    if mode == "train":
        def step():
            engine.training_step(model, optimizer, loss_fn, x, y, amp=mixed)
    else:  # the forward alone, on one batch (engine.predict would add eval() and its batching)
        def step():
            with torch.inference_mode(), torch.autocast(x.device.type, dtype=mixed.dtype if mixed else None,
                                                        enabled=mixed is not None):
                model(x)
    if provider in ("eager-graph", "fused-graph"):
        return engine.capture(step)  # the same step and capture as `python -m fastlenet.train --fused` on CUDA
    return step


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

def time_steps(step, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of `repeats` consecutive calls of step()."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start, end in zip(starts, ends):
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    return seconds


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated q-th percentile (0..100), numpy's default method."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def timed_call(fn, device):
    """(fn's result, wall-clock seconds until the device has finished)."""
    synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - t0


def count_ops(provider: str, mode: str, args, device, init) -> tuple[int | None, str]:
    """(device operations per step, breakdown or the reason there is none), at batch 2: the count
    does not depend on the batch size."""
    if provider in COMPILE_MODES:
        return None, "not counted: Inductor's kernels never reach the ATen dispatcher"
    counted = provider.removesuffix("-graph")
    model, optimizer, loss_fn = build(counted, args.variant, init, device)
    x = torch.randn(2, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (2,), device=device)
    count = count_device_ops(step_function(counted, model, optimizer, loss_fn, x, y, mode, args.amp))
    suffix = ", all captured in one CUDA graph" if provider in GRAPH_PROVIDERS else ""
    return count.total, count.breakdown() + suffix


def measure(provider, batch_size, mode, args, device, init, flops, peak, counts: dict) -> dict:
    """One result row; `counts` caches the operation counts per (provider, mode)."""
    row = {"provider": provider, "batch_size": batch_size, "mode": mode, "available": True,
           "reason": None, "interpreter": False, "images_per_second": None, "p20": None,
           "p80": None, "median_step_ms": None, "first_call_seconds": None,
           "compile_seconds": None, "compile_mode": COMPILE_MODES.get(provider), "launches_per_step": None,
           "ops_breakdown": None,
           "achieved_tflops": None, "fraction_of_peak_fp32": None, "fraction_of_peak_tf32": None}
    interp = provider == "fused" and device.type == "cpu" and interpreting()
    if interp:
        batch_size = row["batch_size"] = INTERPRETER_BATCH
    if why := amp_unavailable(provider, args.amp, device):
        return {**row, "available": False, "reason": why}
    try:
        model, optimizer, loss_fn = build(provider, args.variant, init, device)
    except Unavailable as e:
        return {**row, "available": False, "reason": str(e)}
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch_size, 1, 28, 28, generator=generator).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=generator).to(device)

    def first_step():  # compiles (and for fused-graph warms up and captures), then runs once
        step = step_function(provider, model, optimizer, loss_fn, x, y, mode, args.amp)
        step()
        return step
    try:
        step, row["first_call_seconds"] = timed_call(first_step, device)
    except Exception as e:  # noqa: BLE001 - torch.compile fails in many ways on odd set-ups
        if provider not in COMPILE_MODES:
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        return {**row, "available": False,
                "reason": f"torch.compile failed: {type(e).__name__}: {first_line}"[:400]}
    if provider in COMPILE_MODES:
        row["compile_seconds"] = row["first_call_seconds"]
    if interp:
        # Two more steps through the interpreter (seconds each): one timed, which is no speed
        # figure, and one counted.
        seconds = time_steps(step, device, 1)
        count = count_device_ops(step, warmup=0)
        return {**row, "interpreter": True, "interpreter_seconds_per_step": seconds[0],
                "launches_per_step": count.total, "ops_breakdown": count.breakdown(),
                "reason": "Triton interpreter on the CPU: counts operations, measures no speed"}
    if (provider, mode) not in counts:
        counts[provider, mode] = count_ops(provider, mode, args, device, init)
    row["launches_per_step"], row["ops_breakdown"] = counts[provider, mode]
    for _ in range(max(args.warmup - 1, 0)):
        step()
    synchronize(device)
    seconds = time_steps(step, device, args.repeats)
    throughput = [batch_size / s for s in seconds]
    median_s = statistics.median(seconds)
    row.update(images_per_second=batch_size / median_s, p20=percentile(throughput, 20),
               p80=percentile(throughput, 80), median_step_ms=median_s * 1e3)
    achieved = row["images_per_second"] * flops[mode] / 1e12
    row["achieved_tflops"] = achieved
    if peak:
        row["fraction_of_peak_fp32"] = achieved / peak["fp32"]
        row["fraction_of_peak_tf32"] = achieved / peak["tf32"]
    return row


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def ratio(a, b):
    return a / b if a and b else None


def ratios(results: list[dict]) -> list[dict]:
    speed = {(r["provider"], r["batch_size"], r["mode"]): r["images_per_second"]
             for r in results if not r["interpreter"]}
    out = []
    for mode, bs in sorted({(r["mode"], r["batch_size"]) for r in results if not r["interpreter"]}):
        fused, graph, eager, compiled = (speed.get((p, bs, mode)) for p in
                                         ("fused", "fused-graph", "eager", "compile"))
        # The best of the ways PyTorch runs the network, whichever was measured.
        peers = {p: speed[p, bs, mode] for p in PYTORCH_PROVIDERS if speed.get((p, bs, mode))}
        best = max(peers, key=peers.get) if peers else None
        out.append({"batch_size": bs, "mode": mode, "fused/eager": ratio(fused, eager),
                    "fused/compile": ratio(fused, compiled), "fused-graph/eager": ratio(graph, eager),
                    "best PyTorch": best, "fused-graph/best PyTorch": ratio(graph, peers.get(best))})
    return out


def fmt_speed(row: dict | None) -> str:
    if row is None:
        return "-"
    if not row["available"]:
        return "n/a"
    if row["images_per_second"] is None:
        return "interp."
    return f"{row['images_per_second']:,.0f} ({row['p20']:,.0f}-{row['p80']:,.0f})"


def fmt_ratio(value) -> str:
    return f"{value:.2f}x" if value else "-"


def print_report(results, rats, providers, meta, flops) -> None:
    by_key = {(r["provider"], r["batch_size"], r["mode"]): r for r in results}
    for mode in MODES:
        sizes = sorted({r["batch_size"] for r in results if r["mode"] == mode and not r["interpreter"]})
        if not sizes:
            continue
        print(f"\n{mode}: images/s, median (p20-p80)")
        header = ["batch", *providers, "fused/eager", "fused/compile", "graph/eager", "graph/best PyTorch"]
        rows = []
        for bs in sizes:
            rat = next(x for x in rats if x["batch_size"] == bs and x["mode"] == mode)
            best = fmt_ratio(rat["fused-graph/best PyTorch"])
            rows.append([str(bs), *(fmt_speed(by_key.get((p, bs, mode))) for p in providers),
                         *(fmt_ratio(rat[k]) for k in ("fused/eager", "fused/compile", "fused-graph/eager")),
                         f"{best} ({rat['best PyTorch']})" if best != "-" else "-"])
        widths = [max(len(c) for c in col) for col in zip(header, *rows)]
        for line in (header, *rows):
            print("  ".join(c.rjust(w) for c, w in zip(line, widths)))

    print("\ndevice operations per step (Triton launches + ATen compute ops; "
          "fastlenet.profiling.count_device_ops):")
    seen = set()
    for r in results:
        key = (r["provider"], r["mode"])
        if key in seen:
            continue
        seen.add(key)
        if not r["available"]:
            what = f"unavailable: {r['reason']}"
        elif r["launches_per_step"] is None:
            what = r["ops_breakdown"] or "not counted"
        else:
            what = r["ops_breakdown"] + (" [interpreter]" if r["interpreter"] else "")
        print(f"  {r['provider']:>11} {r['mode']:>9}: {what}")
    for r in results:
        if r["interpreter"]:
            print(f"  note: fused {r['mode']} ran through Triton's interpreter at batch "
                  f"{r['batch_size']}: {r['interpreter_seconds_per_step']:.2f} s/step, not a speed figure")

    peak = meta["peak_tflops"]
    print(f"\nFLOPs per image ({meta['variant']}): forward {flops['forward'] / 1e6:.3f} M, "
          f"train {flops['train'] / 1e6:.3f} M ({meta['flops_convention']})")
    known = ", ".join(sorted({key.split()[0] for key, _, _ in PEAK_TFLOPS}))
    print("best achieved per provider and mode" + (":" if peak else
          f" (no fraction of peak: this device is not in the benchmark's table of peak FLOP/s, which lists "
          f"{known} GPUs):"))
    for provider in providers:
        for mode in MODES:
            rows = [r for r in results if r["provider"] == provider and r["mode"] == mode
                    and r["images_per_second"]]
            if not rows:
                continue
            best = max(rows, key=lambda r: r["images_per_second"])
            frac = (f" = {best['fraction_of_peak_fp32']:.2%} of FP32 peak, "
                    f"{best['fraction_of_peak_tf32']:.2%} of TF32 peak" if peak else "")
            print(f"  {provider:>11} {mode:>9}: {best['achieved_tflops'] * 1e3:,.3g} GFLOP/s at batch "
                  f"{best['batch_size']}{frac}")
    print(f"\nin short: {summary(results)}")


class _Lead:
    """One provider fastest over consecutive batch sizes, and by how much over the runner-up."""

    def __init__(self, winner: str, first_batch: int):
        self.winner, self.first_batch, self.last_batch = winner, first_batch, first_batch
        self.speedups: list[float] = []
        self.runners_up: set[str] = set()


def summary(results: list[dict]) -> str:
    """One line: per mode, the fastest provider at each batch size and how much faster it is than
    the next fastest there. Only measured speeds count (no interpreter runs, no unavailable providers)."""
    parts = []
    for mode in MODES:
        measured = [r for r in results if r["mode"] == mode and r["images_per_second"]]
        if len({r["provider"] for r in measured}) == 1:
            best = max(measured, key=lambda r: r["images_per_second"])
            parts.append(f"{mode}: only {best['provider']} was measured, at best {best['images_per_second']:,.0f} "
                         f"images/s (batch {best['batch_size']})")
            continue
        sizes = sorted({r["batch_size"] for r in measured})
        leads: list[_Lead] = []  # consecutive batch sizes with the same fastest provider
        for bs in sizes:
            ranked = sorted((r for r in measured if r["batch_size"] == bs), key=lambda r: -r["images_per_second"])
            if len(ranked) < 2:
                continue
            first, second = ranked[0], ranked[1]
            if not leads or leads[-1].winner != first["provider"]:
                leads.append(_Lead(first["provider"], bs))
            lead = leads[-1]
            lead.last_batch = bs
            lead.speedups.append(first["images_per_second"] / second["images_per_second"])
            lead.runners_up.add(second["provider"])
        everywhere = len(leads) == 1 and len(leads[0].speedups) == len(sizes) > 1
        said = []
        for lead in leads:
            span = f"{lead.first_batch}" + (f"-{lead.last_batch}" if lead.last_batch != lead.first_batch else "")
            where = "every batch size" if everywhere else f"batch {span}"
            lo, hi = f"{min(lead.speedups):.2f}x", f"{max(lead.speedups):.2f}x"
            than = next(iter(lead.runners_up)) if len(lead.runners_up) == 1 else "the next fastest"
            said.append(f"{lead.winner} at {where} ({lo if lo == hi else f'{lo}-{hi}'} as fast as {than})")
        if said:
            parts.append(f"{mode}: fastest " + ", ".join(said))
    return "; ".join(parts) or "nothing was measured: no provider could run here"


def plot(results: list[dict], path: Path, meta: dict) -> None:
    fig = new_figure(figsize=(11, 4.2), layout="tight")
    axes = fig.subplots(1, 2)
    for ax, mode in zip(axes, MODES):
        for provider in PROVIDERS:
            rows = sorted((r for r in results if r["provider"] == provider and r["mode"] == mode
                           and r["images_per_second"]), key=lambda r: r["batch_size"])
            if not rows:
                continue
            bs = [r["batch_size"] for r in rows]
            line, = ax.plot(bs, [r["images_per_second"] for r in rows], marker="o", label=provider)
            ax.fill_between(bs, [r["p20"] for r in rows], [r["p80"] for r in rows],
                            color=line.get_color(), alpha=0.2)
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s",
               title=f"{mode} ({'full step' if mode == 'train' else 'forward only'})")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"LeNet-5 throughput on {meta['device_name']} (median, band p20-p80)", fontsize=10)
    save_figure(path, fig, dpi=120)



# --------------------------------------------------------------------------------------------------
# Time to accuracy
# --------------------------------------------------------------------------------------------------

def time_to_accuracy(args, device: torch.device) -> list[dict]:
    """Train eager and fused from the same weights and batch order until the test accuracy reaches
    the target. Timed: from the first step to the evaluation that reached it, per-epoch evaluations
    included; the data sits on the device beforehand. Each provider first warms up on a throwaway
    copy with the same shapes (compilation, autotuning, lazy allocations), timed separately. The
    epochs and evaluations are fastlenet.train's: engine.train_epoch and engine.evaluate."""
    from fastlenet import data

    ds = data.load(args.dataset, args.data_dir)
    mean, std = engine.input_normalization(args.variant, args.dataset)
    x_train, y_train = data.to_device(ds.train, device, mean, std)
    x_test, y_test = data.to_device(ds.test, device, mean, std)
    torch.manual_seed(args.seed)
    init = copy.deepcopy(build_model(args.variant).state_dict())
    bs = args.tta_batch_size
    runs = []
    for provider in ("eager", "fused"):
        try:
            if provider == "fused" and device.type != "cuda":
                raise Unavailable("the fused kernels need a CUDA GPU (the interpreter is far too slow "
                                  "to train to accuracy)")
            model, optimizer, loss_fn = build(provider, args.variant, init, device, args.tta_lr)
        except Unavailable as e:
            runs.append({"provider": provider, "available": False, "reason": str(e)})
            print(f"{provider}: unavailable: {e}")
            continue

        # Warm-up on a copy: every shape the run will see (full and last partial batch, evaluation).
        scratch = copy.deepcopy(model)
        scratch_steps = engine.StepRunner(scratch, engine.build_optimizer(scratch, adam(args.tta_lr)), loss_fn,
                                          x_train, y_train, bs)
        last = len(x_train) % bs or bs

        def warm(scratch=scratch, scratch_steps=scratch_steps, last=last, loss_fn=loss_fn):
            for n in sorted({bs, last}):
                scratch_steps(x_train[:n], y_train[:n])
            engine.evaluate(scratch, loss_fn, x_test, y_test)
        _, warmup_seconds = timed_call(warm, device)

        steps = engine.StepRunner(model, optimizer, loss_fn, x_train, y_train, bs)
        generator = torch.Generator().manual_seed(args.seed)  # the same batch order for both
        history = []
        synchronize(device)
        t0 = time.perf_counter()
        for epoch in range(1, args.tta_max_epochs + 1):
            engine.train_epoch(steps, None, x_train, y_train, generator=generator, desc=f"{provider} epoch {epoch}")
            accuracy = engine.evaluate(model, loss_fn, x_test, y_test).accuracy  # .item() synchronises
            elapsed = time.perf_counter() - t0
            history.append({"epoch": epoch, "seconds": elapsed, "test_accuracy": accuracy})
            print(f"{provider}: epoch {epoch}: test accuracy {accuracy:.4f} at {elapsed:.2f} s")
            if accuracy >= args.time_to_accuracy:
                break
        reached = history[-1]["test_accuracy"] >= args.time_to_accuracy
        runs.append({"provider": provider, "available": True, "reached": reached,
                     "seconds": history[-1]["seconds"] if reached else None,
                     "epochs": history[-1]["epoch"], "warmup_seconds": warmup_seconds,
                     "batch_size": bs, "lr": args.tta_lr, "history": history})
    print(f"\ntime to {args.time_to_accuracy:.2%} test accuracy on {device_name(device)} "
          f"(batch {bs}, Adam lr {args.tta_lr}, seed {args.seed}; warm-up/compilation excluded):")
    for run in runs:
        if not run["available"]:
            print(f"  {run['provider']:>6}: unavailable: {run['reason']}")
        elif run["reached"]:
            print(f"  {run['provider']:>6}: {run['seconds']:.2f} s ({run['epochs']} epochs; "
                  f"warm-up {run['warmup_seconds']:.2f} s)")
        else:
            print(f"  {run['provider']:>6}: not reached in {run['epochs']} epochs "
                  f"(best {max(h['test_accuracy'] for h in run['history']):.4f})")
    return runs


# --------------------------------------------------------------------------------------------------

def quiet_cuda_home_warning() -> None:
    """torch.compile's C++ toolchain logs "No CUDA runtime is found, using CUDA_HOME=..." on a machine
    with the CUDA toolkit but no GPU: true, and nothing a CPU run needs to hear."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not record.getMessage().startswith("No CUDA runtime is found"))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = choose_device(args.device)
    except CLIError as e:
        sys.exit(f"error: {e}")
    if not torch.cuda.is_available():
        quiet_cuda_home_warning()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    print(f"device: {device} ({device_name(device)}); torch {torch.__version__}"
          + (", Triton interpreter on" if interpreting() else ""))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # eager/compile get cuDNN's best algorithms
    torch.manual_seed(args.seed)
    reference = build_model(args.variant)
    init = copy.deepcopy(reference.state_dict())
    flops = model_flops(reference)
    flops_per_mode = {"train": flops["train"], "inference": flops["forward"]}
    meta = metadata(args, device, flops)

    if args.time_to_accuracy is not None:
        runs = time_to_accuracy(args, device)
        if args.json:
            write_json(args.json, {"meta": meta, "time_to_accuracy": runs})
        return 0

    from tqdm import tqdm

    peak = meta["peak_tflops"]
    jobs = [(p, bs, m) for p in args.providers for m in args.modes for bs in args.batch_sizes]
    results, counts, interpreted = [], {}, set()
    # disable=None: a bar on a terminal only, so that logs of the run stay clean
    for provider, bs, mode in tqdm(jobs, desc="measuring", leave=False, disable=None):
        if provider == "fused" and device.type == "cpu" and interpreting():
            if (provider, mode) in interpreted:
                continue  # the interpreter check runs once per mode, at its own tiny batch
            interpreted.add((provider, mode))
        results.append(measure(provider, bs, mode, args, device, init, flops_per_mode, peak, counts))

    rats = ratios(results)
    print_report(results, rats, args.providers, meta, flops)
    payload = {"meta": meta, "results": results, "ratios": rats}
    if args.json:
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(results, args.plot, meta)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
