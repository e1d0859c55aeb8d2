"""Predicted GPU times of a fused step's launches, and the calibration they rest on (timing.py).

    python -m fastlenet.analysis.report --predict --batch 4096 [--gpu h100|h200|a100] [--mode train|inference] [--json]
    python -m fastlenet.analysis.report --calibration [--json]

The constants are fitted when asked, from two files of a source checkout: a GPU measurement
(bench/measured/h100-2026-11-22.json) and what bench/measured_kernels.py read of the kernels it
measured. Every time printed here is a prediction, not a measurement, except the measured column of
the calibration.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import asdict

from fastlenet.kernels.accounting import work

from . import timing
from .gpus import GPUS, Gpu
from .step_work import aten_launches, launches_work

MEASURED = pathlib.Path(__file__).resolve().parents[2] / "bench" / "measured"
MEASUREMENT = MEASURED / "h100-2026-11-22.json"
KERNELS = MEASURED / "h100-2026-11-22.kernels.json"


def load(measurement: pathlib.Path = MEASUREMENT, kernels: pathlib.Path = KERNELS) -> tuple[dict, dict]:
    """The measurement and its kernels' file, or a FileNotFoundError / ValueError saying which is wrong."""
    out = []
    for path in (measurement, kernels):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the calibration reads it from a source checkout of fastlenet")
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    return out[0], out[1]


def calibration(measurement: dict, kernels: dict) -> timing.Calibration:
    gpu = next((g for g in GPUS.values() if g.name.split()[0] in measurement["meta"]["gpu"]), None)
    if gpu is None:
        raise ValueError(f"no published figures for the measured GPU ({measurement['meta']['gpu']})")
    return timing.calibrate(timing.calibration_rows(measurement, kernels, gpu))


def useful_macs(descs: list[dict]) -> dict[str, int]:
    """Multiply-adds of the layer each launch computes (its kernel's accounting: every job's useful FLOPs / 2)."""
    return {d["origins"][0]: sum(job.useful for job in work(d).jobs) // 2 for d in descs}


def predicted_step(recorded: dict, gpu: Gpu, constants: dict, **build) -> dict:
    """Per launch of a recorded step (report.record_step) on `gpu`: the bounds, the one that holds,
    the predicted time and the instructions per useful multiply-add; and the step's sum."""
    launches, toolchain = launches_work(recorded["launches"], gpu.cc, **build)
    if recorded["mode"] == "train":
        launches += aten_launches(recorded["parameters"])
    model = timing.StepModel(launches, gpu, useful_macs(recorded["launches"]))
    predictions = model.predict(constants)
    return {"predicted": "by fastlenet.analysis.timing from compiled code; predicted, not measured",
            "gpu": gpu.name, "target": f"sm_{gpu.cc}", "variant": recorded["variant"], "batch": recorded["batch"],
            "mode": recorded["mode"], "precision": recorded["precision"], "toolchain": toolchain,
            "constants": constants, "launches": [asdict(p) for p in predictions],
            "step_seconds": sum(p.seconds for p in predictions)}


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def format_prediction(p: dict) -> str:
    total = p["step_seconds"]
    lines = [f"Predicted, not measured: one fused {p['variant']} {p['mode']} step at batch {p['batch']} on an "
             f"{p['gpu']} (compiled for {p['target']} with Triton {p['toolchain']['triton']}; float32 dots "
             f"{', '.join(f'{k} {v}' for k, v in p['precision'].items())}).", "",
             f"{'launch':<20} {'kernel':<28} {'predicted us':>12} {'share':>6}  {'bound':<8} {'instr/MAC':>9}",
             "-" * 89]
    for launch in p["launches"]:
        ratio = "-" if launch["instructions_per_mac"] is None else f"{launch['instructions_per_mac']:.2f}"
        lines.append(f"{launch['label']:<20} {launch['kernel']:<28} {_us(launch['seconds']):>12} "
                     f"{launch['seconds'] / total:>6.1%}  {launch['bound']:<8} {ratio:>9}")
    step = f"{len(p['launches'])} launches"
    lines += ["-" * 89, f"{'step':<20} {step:<28} {_us(total):>12}   predicted, not measured",
              "", "bound: the largest of dram (bytes / bandwidth), tensor / fma (FLOPs / peak), issue (instructions "
              "over every scheduler), latency (dependent memory waits and serial issue of the longest program, or "
              "all programs over the GPU's slots); each launch adds the launch gap.",
              "instr/MAC: thread instructions issued per useful multiply-add of the layer (an FFMA does one: 1.0 "
              "is all arithmetic on CUDA cores).",
              "constants (fitted on the H100 measurement, python -m fastlenet.analysis.report --calibration): "
              + ", ".join(_constant(c, p["constants"][c.name]) for c in timing.CONSTANTS)]
    return "\n".join(lines)


def _constant(c: timing.Constant, value: float) -> str:
    return f"{c.name} {value * 1e6:.2f} us" if c.unit == "s" else f"{c.name} {value:.3f}"


def calibration_json(cal: timing.Calibration, measurement: dict, kernels: dict) -> dict:
    return {"what": "the timing model's constants fitted on a GPU measurement, and its leave-one-batch-out check",
            "measurement": kernels["measurement"], "gpu": measurement["meta"]["gpu"],
            "measured_with": kernels["measured_with"], "kernels_of_commit": kernels["commit"],
            "compiled_with": kernels["toolchain"], "constants": cal.constants,
            "ranges": {c.name: [c.low, c.high, c.why] for c in timing.CONSTANTS},
            "at_range_limit": timing.at_limit(cal.constants), "rows": cal.rows,
            "held_out_constants": {str(b): k for b, k in cal.held_out.items()},
            "worst_held_out_error": cal.worst_error()}


def format_calibration(cal: timing.Calibration, measurement: dict, kernels: dict) -> str:
    lines = [f"Calibration of the timing model on {kernels['measurement']} ({measurement['meta']['gpu']}, "
             f"Triton {kernels['measured_with']['triton']}): the fused-graph rows, the kernels of commit "
             f"{kernels['commit'][:7]} compiled here with Triton {kernels['toolchain']['triton']}.", "",
             f"{'batch':>6} {'mode':<10} {'measured us':>12} {'fitted us':>10} {'error':>7} "
             f"{'held out us':>12} {'error':>7}", "-" * 70]
    for r in cal.rows:
        lines.append(f"{r['batch']:>6} {r['mode']:<10} {_us(r['measured']):>12} {_us(r['predicted']):>10} "
                     f"{r['predicted'] / r['measured'] - 1:>+7.1%} {_us(r['held_out']):>12} "
                     f"{r['held_out'] / r['measured'] - 1:>+7.1%}")
    limits = timing.at_limit(cal.constants)
    lines += ["-" * 70, f"held out: fitted on the other three batch sizes, this one predicted. Worst held-out "
              f"error {cal.worst_error():.1%}.", "", "constants (fitted on every row; range, and why):"]
    for c in timing.CONSTANTS:
        low, high = (f"{v * 1e6:g} us" if c.unit == "s" else f"{v:g}" for v in (c.low, c.high))
        mark = "  <- at the end of its range" if c.name in limits else ""
        lines.append(f"  {_constant(c, cal.constants[c.name])}  [{low}, {high}]{mark}\n      {c.why}")
    return "\n".join(lines)
