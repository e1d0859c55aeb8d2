"""A timing model of a step's launches on a named GPU, from their compiled code (step_work.py), with
four physical constants fitted to one GPU measurement.

Per launch, five bounds (seconds), none of which the launch can beat:

- dram: its compulsory bytes / (HBM bandwidth x dram_fraction);
- tensor, fma: the FLOPs its MMA / FFMA instructions issue / the GPU's peak for them;
- issue: the warp instructions all its programs issue / (4 schedulers x clock x the SMs it occupies):
  every scheduler issuing one instruction a cycle, as it can while other warps hide each one's stalls;
- latency: its programs' serial time, each program taking memory_wait per dependent memory wait
  (sass.load_depth per run of each loop trip and branch) plus its own instructions, one a cycle per
  scheduler (its warps share the SM's 4), over issue_efficiency: alone, a warp stalls on each
  dependent instruction; the launch takes the longer of its slowest program and its programs' total
  over the slots the GPU holds at once (occupancy x SMs) -- the waves, without rounding: programs
  of unequal length pack -- plus the longest work gated on an arrival counter (a finishing sum,
  which starts when the last partial has arrived).

Its time is the largest bound plus launch_gap: in a CUDA graph, one kernel's end to the next one's
start, where nothing overlaps. A step is the sum of its launches. The ATen kernels of the optimizer
are modelled from their dependent waits and bytes only (step_work.aten_launches).

The constants are each a physical figure with a published range (CONSTANTS); `fit` finds them on a
measurement's rows, `leave_one_out` fits on all batch sizes but one and predicts that one.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from .gpu_build import SM_LIMITS
from .gpus import Gpu, occupancy


@dataclass(frozen=True)
class Constant:
    name: str
    low: float
    high: float
    unit: str
    why: str


# The range each constant may take, and the published figure that bounds it.
CONSTANTS = (
    Constant("dram_fraction", 0.6, 0.95, "", "achieved share of HBM bandwidth: streaming copies reach about 90 % on "
             "H100 and A100 (NVIDIA's STREAM-like bandwidthTest figures)"),
    Constant("issue_efficiency", 0.2, 1.0, "", "share of issue slots one program's warps fill on their own: one "
             "instruction a cycle at best (CUDA C++ Programming Guide, 'Hardware Multithreading'), about 1/4 where "
             "each instruction waits for the one before (4-6 cycles of dependent ALU latency)"),
    Constant("memory_wait", 0.3e-6, 2.0e-6, "s", "one wait for global memory: about 0.5-0.7 us from DRAM on H100/A100 "
             "(microbenchmarks: Jia et al., 'Dissecting the Ampere GPU architecture'; Luo et al., 'Benchmarking and "
             "Dissecting the Nvidia Hopper GPU Architecture'), more with a fence or under load"),
    Constant("launch_gap", 0.5e-6, 4.0e-6, "s", "one kernel's end to the next one's start in a CUDA graph: about "
             "1-2 us (NVIDIA's CUDA Graphs blog, 'Getting Started with CUDA Graphs')"),
)
NAMES = tuple(c.name for c in CONSTANTS)


@dataclass(frozen=True)
class Prediction:
    label: str
    kernel: str
    bounds: dict  # bound name -> seconds
    bound: str  # the largest
    seconds: float  # largest bound + launch gap
    instructions_per_mac: float | None  # thread instructions issued per useful multiply-add (None: not a layer)


class _Launch:
    """A launch's constant-free quantities, computed once (fitting evaluates the model many times)."""

    def __init__(self, launch: dict, gpu: Gpu):
        self.label, self.kernel = launch["label"], launch["kernel"]
        self.bytes = launch["bytes"]
        self.aten = bool(launch.get("aten"))
        if self.aten:
            self.dependent = launch["dependent"]
            return
        w = launch["work"]
        warps = w["num_warps"]
        classes = w["classes"]
        programs = sum(c["programs"] for c in classes)
        occ = occupancy(launch["registers"], warps, launch["shared"], SM_LIMITS[gpu.cc]).programs
        if occ == 0:
            raise ValueError(f"{self.label}: {launch['kernel']} fits no SM of an {gpu.name}")
        self.slots = occ * gpu.sms
        self.warp_instructions = sum(c["programs"] * c["instructions"] * warps for c in classes)
        # Cycles of issue across the SMs the grid occupies, before issue_efficiency.
        self.issue_cycles = self.warp_instructions / (4 * min(gpu.sms, programs))
        self.tensor = sum(c["programs"] * c["mma_flops"] * warps for c in classes) / gpu.tf32
        self.fma = sum(c["programs"] * c["fma_flops"] * warps for c in classes) / gpu.fp32
        # Per class: (programs, dependent waits, its own issue cycles: a scheduler serves ceil(warps / 4)),
        # and the same of its work gated on an arrival counter (programs.ProgramClass).
        per = math.ceil(warps / 4)
        self.classes = [(c["programs"], c["dependent"], c["instructions"] * per, c.get("gated_dependent", 0),
                         c.get("gated_instructions", 0) * per) for c in classes]
        self.clock = gpu.clock

    def bounds(self, k: dict, gpu: Gpu) -> dict:
        dram = self.bytes / (gpu.hbm * k["dram_fraction"])
        if self.aten:
            return {"dram": dram, "latency": self.dependent * k["memory_wait"]}
        def serial(waits, cycles):
            return waits * k["memory_wait"] + cycles / (self.clock * k["issue_efficiency"])
        whole = [serial(d, c) for _, d, c, _, _ in self.classes]
        gated = [serial(gd, gc) for _, _, _, gd, gc in self.classes]
        # Work gated on an arrival counter starts once the programs sharing the counter have arrived:
        # after the rest of the launch's work, not beside it.
        own = sum(n * (t - g) for (n, *_), t, g in zip(self.classes, whole, gated)) / self.slots
        latency = max(max(whole), own + max(gated))
        return {"dram": dram, "tensor": self.tensor, "fma": self.fma,
                "issue": self.issue_cycles / self.clock, "latency": latency}


class StepModel:
    """The model of one step's launches (step_work dicts) on `gpu`."""

    def __init__(self, launches: list[dict], gpu: Gpu, useful_macs: dict[str, int] | None = None):
        self.gpu = gpu
        self.launches = [_Launch(launch, gpu) for launch in launches]
        self.useful_macs = useful_macs or {}

    def seconds(self, k: dict) -> float:
        return sum(max(lp.bounds(k, self.gpu).values()) + k["launch_gap"] for lp in self.launches)

    def predict(self, k: dict) -> list[Prediction]:
        out = []
        for lp in self.launches:
            b = lp.bounds(k, self.gpu)
            bound = max(b, key=b.get)
            macs = self.useful_macs.get(lp.label)
            ratio = 32 * lp.warp_instructions / macs if macs and not lp.aten else None
            out.append(Prediction(lp.label, lp.kernel, b, bound, b[bound] + k["launch_gap"], ratio))
        return out


# --------------------------------------------------------------------------------------------------
# Fitting: the constants that make the model's steps closest to measured ones, within their ranges.
# --------------------------------------------------------------------------------------------------

def _error(models: list[tuple[StepModel, float]], k: dict) -> float:
    """Sum of squared log ratios, predicted / measured: a 2x miss costs the same either way. A
    millionth of each constant's squared distance from its range's (geometric) centre breaks ties:
    a constant no row depends on (a bound that never binds) sits at the centre, not at an end."""
    centred = sum((math.log(k[c.name] / math.sqrt(c.low * c.high)) / math.log(c.high / c.low)) ** 2
                  for c in CONSTANTS)
    return sum(math.log(m.seconds(k) / measured) ** 2 for m, measured in models) + 1e-6 * centred


def _values(c: Constant, n: int) -> list[float]:
    return [c.low * (c.high / c.low) ** (i / (n - 1)) for i in range(n)]


def fit(models: list[tuple[StepModel, float]], grid: int = 7, rounds: int = 3) -> dict:
    """Constants minimising _error over (model, measured seconds) pairs: a log-spaced grid over each
    constant's range, then rounds of golden-section search along one constant at a time. Deterministic."""
    best = min((dict(zip(NAMES, v)) for v in itertools.product(*(_values(c, grid) for c in CONSTANTS))),
               key=lambda k: _error(models, k))
    for _ in range(rounds):
        for c in CONSTANTS:
            lo, hi = math.log(c.low), math.log(c.high)
            ratio = (math.sqrt(5) - 1) / 2
            for _ in range(30):
                a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
                if _error(models, {**best, c.name: math.exp(a)}) <= _error(models, {**best, c.name: math.exp(b)}):
                    hi = b
                else:
                    lo = a
            candidate = {**best, c.name: math.exp((lo + hi) / 2)}
            if _error(models, candidate) <= _error(models, best):
                best = candidate
    return best


def at_limit(k: dict, tolerance: float = 0.02) -> list[str]:
    """Constants the fit left at an end of their range: the range, not the data, decided them."""
    out = []
    for c in CONSTANTS:
        span = math.log(c.high / c.low)
        if math.log(k[c.name] / c.low) < tolerance * span or math.log(c.high / k[c.name]) < tolerance * span:
            out.append(c.name)
    return out


# --------------------------------------------------------------------------------------------------
# Calibration on a measurement: rows of (batch, mode, measured seconds, the kernels' step_work).
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    batch: int
    mode: str  # "train" / "inference"
    measured: float  # seconds
    model: StepModel


def calibration_rows(measurement: dict, kernels: dict, gpu: Gpu, provider: str = "fused-graph") -> list[Row]:
    """The measurement's `provider` rows, each with the model of the kernels it ran (a
    bench/measured_kernels.py file)."""
    work = {(r["batch"], r["mode"]): r["launches"] for r in kernels["rows"]}
    rows = []
    for r in measurement["results"]:
        if r["provider"] != provider or not r.get("available", True):
            continue
        key = (r["batch_size"], r["mode"])
        if key not in work:
            raise ValueError(f"the kernels file has no {key[1]} step at batch {key[0]}: "
                             f"rerun bench/measured_kernels.py")
        rows.append(Row(key[0], key[1], r["median_step_ms"] * 1e-3, StepModel(work[key], gpu)))
    return sorted(rows, key=lambda r: (r.mode, r.batch))


@dataclass(frozen=True)
class Calibration:
    constants: dict  # fitted on every row
    rows: list  # per row: batch, mode, measured, predicted with `constants`, held_out (fit without its batch)
    held_out: dict  # batch -> the constants fitted without it

    def worst_error(self) -> float:
        return max(abs(r["held_out"] / r["measured"] - 1) for r in self.rows)


def calibrate(rows: list[Row]) -> Calibration:
    """Fit on all rows, and leave each batch size out in turn: fit on the others, predict its rows."""
    everything = fit([(r.model, r.measured) for r in rows])
    held: dict[int, dict] = {}
    for batch in sorted({r.batch for r in rows}):
        held[batch] = fit([(r.model, r.measured) for r in rows if r.batch != batch])
    out = [{"batch": r.batch, "mode": r.mode, "measured": r.measured, "predicted": r.model.seconds(everything),
            "held_out": r.model.seconds(held[r.batch])} for r in rows]
    return Calibration(everything, out, held)
