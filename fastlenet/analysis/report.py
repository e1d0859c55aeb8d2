"""What the compiled kernels of one training step say, read statically: how they fill the GPU, how
their dots lowered, how much of their arithmetic is padding, and the floor under each one's time.

    python -m fastlenet.analysis.report --batch 4096 --arch 90 [--variant lenet5] [--json]

Every Triton launch of one fused LeNet-5 training step is recorded without running it (float32
dots as PyTorch's switches choose them on a GPU: TF32 convolutions, IEEE matmuls by default) and
compiled by gpu_build for the target, as the JIT would compile it (cached: a second run compiles
nothing). Per launch this reads

- from ptxas: registers per thread and shared memory per program; with the target's per-SM limits
  (gpu_build.SM_LIMITS, the rules of CUDA's cuda_occupancy.h) the programs resident per SM, and the
  waves the grid takes on the target's GPU (sm_90: H100 SXM, sm_80: A100 SXM);
- from the TTGIR: how each tl.dot lowered (tensor-core MMA, its version, precision, warpsPerCTA and
  instrShape; or FMA on CUDA cores) and how many warps compute each product of its tile
  (replication: a layout that covers more than the tile repeats it across warps);
- from the launch's sizes and block sizes: useful FLOPs (2 per multiply-add of the layer, as
  fastlenet.profiling.model_flops counts them), executed FLOPs (what the tiles compute, padding
  included) and issued FLOPs (executed x replication); each kernel's formulas sit beside its launch
  helper (fastlenet.kernels.accounting.work finds them);
- the compulsory bytes (each tensor the kernel reads or writes, once) and the roofline floor
  max(bytes / HBM bandwidth, useful FLOPs / peak), with the GPU's published figures (GPUS).

A floor is a lower bound no kernel can beat, not a prediction; nothing here is measured.
"""
from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

from fastlenet.kernels.accounting import work
from fastlenet.kernels.launch import DOT_KINDS

from .gpu_build import SM_LIMITS, build, default_cache_dir
from . import predict
from .gpus import BY_ARCH as GPUS
from .gpus import GPUS as GPUS_BY_NAME
from .gpus import Gpu, Occupancy, occupancy


# --------------------------------------------------------------------------------------------------
# TTGIR: how each tl.dot lowered, and how many warps compute each of its products.
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DotSite:
    """One tl.dot of the source as the TTGIR lowered it (the sm_80 pipeline may split one dot
    into several ops along K: `ops` counts them)."""
    function: str  # the @triton.jit function the tl.dot is written in
    line: int
    lowering: str  # "MMAv2" / "MMAv3" (tensor cores: mma.sync / wgmma) or "FMA" (CUDA cores)
    precision: str  # input precision: "tf32", "ieee", ...
    tile: tuple[int, int]  # M x N of the dot's result tile
    layout: str  # the result's encoding, as the TTGIR writes it
    covers: tuple[int, int]  # the M x N extent the layout covers at once
    replication: int  # how many times each product of the tile is computed
    ops: int = 1


_LOCATION = re.compile(r"^(#loc\d*) = loc\((.*)\)$", re.M)
_ALIAS = re.compile(r"^(#\w+) = (#[\w.]+<\{.*\}>)$", re.M)
_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) (.*?)-> tensor<(\d+)x(\d+)x\w+, "
                  r"(#[\w.]+(?:<\{[^}]*\}>)?)> loc\((.*)\)$", re.M)


def _input_precisions() -> dict[str, str]:
    """tt.dot's InputPrecision enum by number (how ttng.warp_group_dot prints it), from Triton."""
    try:
        from triton._C.libtriton import ir

        # A pybind11 enum (Triton 3.8) converts with int(); a Python enum (3.9) has .value.
        return {str(int(getattr(v, "value", v))): k.lower() for k, v in ir.INPUT_PRECISION.__members__.items()}
    except (ImportError, AttributeError):
        return {"0": "tf32", "1": "tf32x3", "2": "ieee"}


def _source_line(location: str, locations: dict[str, str]) -> tuple[str, int] | None:
    """(file, line) where an op is written: through location aliases, names and call sites (an
    inlined @triton.jit function's op is located at the callee's line, called at the caller's)."""
    text = location.strip()
    for _ in range(100):
        if text.startswith("#loc"):
            text = locations.get(text, "unknown")
        elif m := re.match(r'"([^"]*)":(\d+):\d+', text):
            return m.group(1), int(m.group(2))
        elif m := re.fullmatch(r"callsite\((\S+) at .*\)", text):
            text = m.group(1)
        elif m := re.fullmatch(r'"[^"]*"\((.*)\)', text):
            text = m.group(1)
        elif m := re.match(r"fused(?:<[^>]*>)?\[([^,\]]+)", text):
            text = m.group(1)
        else:
            return None
    return None


@functools.lru_cache(maxsize=None)
def _functions(path: str) -> list[tuple[int, int, str]]:
    """(first line, last line, name) of every function in a source file, innermost first."""
    tree = ast.parse(pathlib.Path(path).read_text())
    spans = [(n.lineno, n.end_lineno, n.name) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    return sorted(spans, key=lambda s: s[1] - s[0])


def _function_at(file: str, line: int, source_dir: pathlib.Path | None) -> str:
    # The file of that name beside the kernel's module: the cached TTGIR may come from another
    # checkout, but the same cache key means the same source and first line of every @triton.jit
    # function involved (the JIT's hash covers both), so the same line numbers.
    path = source_dir / pathlib.Path(file).name if source_dir else pathlib.Path(file)
    if not path.exists():
        path = pathlib.Path(file)
    if not path.exists():
        return "?"
    return next((name for first, last, name in _functions(str(path)) if first <= line <= last), "?")


def _fields(encoding: str) -> tuple[str, dict]:
    """('nvidia_mma' / 'blocked' / ..., {parameter: int or list of ints}) of a layout encoding."""
    kind = re.match(r"#\w+\.(\w+)<", encoding)
    params = {k: [int(x) for x in v.split(",") if x.strip()] for k, v in re.findall(r"(\w+) = \[([\d, ]*)\]", encoding)}
    params.update({k: int(v) for k, v in re.findall(r"(\w+) = (\d+)\b", encoding)})
    return (kind.group(1) if kind else encoding), params


def dot_sites(ttgir: str, source_dir: pathlib.Path | None = None) -> list[DotSite]:
    """Every tl.dot in a TTGIR module: where it is written, how it lowered, and its replication,
    prod over M and N of max(1, covered extent / tile extent), where the covered extent is
    warpsPerCTA x instrShape for an MMA layout (a warp computes instrShape[0] rows of an mma.sync,
    or its 16-row quarter of a warp group's wgmma) and sizePerThread x threadsPerWarp x
    warpsPerCTA for a blocked (FMA) layout. Source lines are mapped to functions in the files of
    `source_dir` (the kernel's package), else at the paths the TTGIR names."""
    locations = dict(_LOCATION.findall(ttgir))
    aliases = dict(_ALIAS.findall(ttgir))
    precisions = _input_precisions()
    sites: dict[tuple[str, int], DotSite] = {}
    for _, attributes, m, n, encoding, location in _DOT.findall(ttgir):
        tile = (int(m), int(n))
        layout = aliases.get(encoding, encoding)
        kind, params = _fields(layout)
        if kind in ("nvidia_mma", "mma"):
            lowering = f"MMAv{params.get('versionMajor', '?')}"
            covers = tuple(w * i for w, i in zip(params["warpsPerCTA"], params["instrShape"][:2]))
        elif kind == "blocked":
            lowering = "FMA"
            covers = tuple(s * t * w for s, t, w in zip(params["sizePerThread"], params["threadsPerWarp"],
                                                       params["warpsPerCTA"]))
        else:
            lowering, covers = kind, tile
        precision = re.search(r"inputPrecision = (\w+)", attributes)
        # tt.dot prints its input precision only where it is not the default, IEEE.
        precision = precisions.get(precision.group(1), precision.group(1)) if precision else "ieee"
        source = _source_line(location, locations)
        function = _function_at(*source, source_dir) if source else "?"
        key = (function, source[1] if source else 0)
        replication = math.prod(max(1, c // t) for c, t in zip(covers, tile))
        if key in sites:
            sites[key] = DotSite(**{**asdict(sites[key]), "ops": sites[key].ops + 1})
        else:
            sites[key] = DotSite(function, key[1], lowering, precision, tile, layout, covers, replication)
    return list(sites.values())


def source_dir(module: str) -> pathlib.Path:
    """The directory of a kernel's module, whose files the TTGIR's locations name."""
    return pathlib.Path(importlib.util.find_spec(module).origin).parent


# --------------------------------------------------------------------------------------------------
# One launch, one step.
# --------------------------------------------------------------------------------------------------

@dataclass
class LaunchReport:
    label: str  # which layer and direction launched it ("conv1 forward")
    kernel: str
    programs: int
    registers: int
    shared: int  # bytes per program
    num_warps: int
    occupancy: Occupancy
    waves: float  # programs / (resident per SM x SMs)
    jobs: list[dict]  # per job: its Job fields, its dots (DotSite fields) and its replication
    useful: int
    executed: int
    issued: int  # executed x replication
    bytes_read: int
    bytes_written: int
    memory_s: float  # bytes / HBM bandwidth
    compute_s: float  # useful FLOPs / the peak of the units its dots run on
    floor_s: float

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"

    def dot_summary(self) -> str:
        """'MMAv2 tf32 x4', 'FMA ieee dx x1 dw x1', or '-' without a dot."""
        dots = [(job["name"], site) for job in self.jobs for site in job["dots"]]
        if not dots:
            return "-"
        kinds = sorted({f"{s['lowering']} {s['precision']}" for _, s in dots})
        reps = " ".join(f"{job['name']} x{job['replication']}".strip() for job in self.jobs if job["dots"])
        return f"{'/'.join(kinds)} {reps}"


def _peak(gpu: Gpu, sites: list[DotSite]) -> float:
    """The peak of the units a job's dots run on: TF32 tensor cores for a TF32 MMA, the CUDA cores
    for FMA; the slower where a job mixes them."""
    peaks = []
    for s in sites:
        if s.lowering.startswith("MMA") and s.precision == "tf32":
            peaks.append(gpu.tf32)
        elif s.lowering == "FMA":
            peaks.append(gpu.fp32)
        else:
            raise ValueError(f"no peak known for a {s.lowering} {s.precision} dot")
    return min(peaks)


def analyse(desc: dict, result: dict, cc: int) -> LaunchReport:
    """The report of one recorded launch (a fastlenet.kernels.launch.describe dict) from its compiled
    kernel (a gpu_build.build result with its TTGIR) for target `cc`."""
    if "error" in result:
        raise RuntimeError(f"{desc['kernel']} ({', '.join(desc['origins'])}) did not build for sm_{cc}: "
                           f"{result['error'].splitlines()[-1]}")
    gpu, sm = GPUS[cc], SM_LIMITS[cc]
    w = work(desc)
    sites = dot_sites(result["ttgir"], source_dir(desc["module"]))
    known = {job.function for job in w.jobs}
    stray = [s for s in sites if s.function not in known]
    if stray:
        raise ValueError(f"{desc['kernel']}: a dot in {stray[0].function} (line {stray[0].line}) belongs to no "
                         f"job of {desc['module']}'s accounting ({sorted(known) or 'none'})")
    jobs, issued, compute_s = [], 0, 0.0
    for job in w.jobs:
        mine = [s for s in sites if s.function == job.function]
        # The formulas' tiles must be the compiled ones, or their FLOP counts describe another kernel.
        if len(mine) != job.dots or any(s.tile != job.tile for s in mine):
            raise ValueError(f"{desc['kernel']}: {desc['module']}'s accounting expects {job.dots} dot(s) of "
                             f"{job.tile[0]}x{job.tile[1]} in {job.function}; the TTGIR has "
                             f"{[f'{s.tile[0]}x{s.tile[1]} at line {s.line}' for s in mine]}")
        replication = max((s.replication for s in mine), default=1)
        issued += job.executed * replication
        compute_s += job.useful / _peak(gpu, mine) if job.useful else 0.0
        jobs.append({**asdict(job), "replication": replication, "dots": [asdict(s) for s in mine]})
    occ = occupancy(result["registers"], result["num_warps"], result["shared"], sm)
    programs = math.prod(desc["grid"])
    bytes_read, bytes_written = sum(w.reads.values()), sum(w.writes.values())
    memory_s = (bytes_read + bytes_written) / gpu.hbm
    return LaunchReport(
        label=", ".join(desc["origins"]), kernel=desc["kernel"], programs=programs,
        registers=result["registers"], shared=result["shared"], num_warps=result["num_warps"],
        occupancy=occ, waves=programs / (occ.programs * gpu.sms) if occ.programs else math.inf,
        jobs=jobs, useful=sum(j.useful for j in w.jobs), executed=sum(j.executed for j in w.jobs),
        issued=issued, bytes_read=bytes_read, bytes_written=bytes_written,
        memory_s=memory_s, compute_s=compute_s, floor_s=max(memory_s, compute_s))


@dataclass
class StepReport:
    """The launches of one training step on one target: data, with a table as its str()."""
    variant: str
    batch: int
    cc: int
    precision: dict  # float32 dot precision by kind, as recorded
    toolchain: dict  # Triton and ptxas versions
    launches: list[LaunchReport]
    build: dict  # distinct compiled kernels, how many came from gpu_build's cache, how many were built

    @property
    def gpu(self) -> Gpu:
        return GPUS[self.cc]

    def totals(self) -> dict:
        return {key: sum(getattr(r, key) for r in self.launches)
                for key in ("useful", "executed", "issued", "bytes_read", "bytes_written", "floor_s")}

    def to_json(self) -> dict:
        return {"static_analysis": "of compiled code; nothing measured. Floors are lower bounds from "
                                   "published figures, not predictions.",
                "variant": self.variant, "batch": self.batch, "target": f"sm_{self.cc}",
                "gpu": asdict(self.gpu), "sm_limits": asdict(SM_LIMITS[self.cc]),
                "precision": self.precision, "toolchain": self.toolchain, "build": self.build,
                "launches": [{**asdict(r), "bound": r.bound} for r in self.launches], "totals": self.totals()}

    def __str__(self) -> str:
        g = self.gpu
        columns = [("launch", "<14"), ("programs", ">8"), ("regs", ">4"), ("smem KiB", ">8"), ("per SM", ">9"),
                   ("waves", ">7"), ("dot (xN: N copies)", "<24"), ("useful", ">9"), ("executed", ">9"),
                   ("issued", ">9"), ("MB", ">7"), ("floor us", ">8"), ("bound", "<7")]

        def row(*cells):
            return " ".join(f"{'' if c is None else c:{fmt}}" for c, (_, fmt) in zip(cells, columns)).rstrip()

        header = row(*(name for name, _ in columns))
        lines = [
            f"Static analysis of the compiled kernels of one {self.variant} training step, batch {self.batch}, "
            f"sm_{self.cc}: Triton {self.toolchain.get('triton', '?')}, ptxas {self.toolchain.get('ptxas', '?')}. "
            f"Read from ptxas and the TTGIR of {self.build['compiled_kernels']} compiled kernels "
            f"({self.build['from_cache']} from the cache); nothing measured.",
            f"float32 dots: {', '.join(f'{kind} {p}' for kind, p in self.precision.items())}. Waves and floors "
            f"for an {g.name}: {g.sms} SMs, {g.hbm / 1e12:g} TB/s, {g.tf32 / 1e12:g} TFLOP/s TF32 tensor, "
            f"{g.fp32 / 1e12:g} TFLOP/s FP32 (published figures).",
            "", header, "-" * len(header)]
        for r in self.launches:
            occ = f"{r.occupancy.programs} {_SHORT[r.occupancy.limiter]}"
            lines.append(row(r.label, r.programs, r.registers, f"{r.shared / 1024:.1f}", occ, f"{r.waves:.3g}",
                             r.dot_summary(), f"{r.useful / 1e6:.1f}", f"{r.executed / 1e6:.1f}",
                             f"{r.issued / 1e6:.1f}", f"{(r.bytes_read + r.bytes_written) / 1e6:.2f}",
                             f"{r.floor_s * 1e6:.2f}", r.bound))
        t = self.totals()
        lines += ["-" * len(header),
                  row("total", None, None, None, None, None, f"{len(self.launches)} launches",
                      f"{t['useful'] / 1e6:.1f}", f"{t['executed'] / 1e6:.1f}", f"{t['issued'] / 1e6:.1f}",
                      f"{(t['bytes_read'] + t['bytes_written']) / 1e6:.2f}", f"{t['floor_s'] * 1e6:.2f}"),
                  "",
                  "per SM: programs resident at once, and the resource that allows no more; waves: programs / "
                  f"(per SM x {g.sms} SMs).",
                  "dot: how each tl.dot lowered (MMAv2: mma.sync, MMAv3: wgmma, FMA: CUDA cores) and xN: its layout "
                  "computes each product N times (N > 1: warps repeat each other's work).",
                  "MFLOP useful: 2 per multiply-add of the layer; executed: what the tiles compute, padding "
                  "included; issued: executed x N. MB: each tensor read or written once.",
                  "floor: max(MB / bandwidth, useful / peak), a lower bound on the kernel's time, not a "
                  "prediction. The optimizer step is an ATen op, not a Triton launch: not listed.",
                  "", "Dots in the TTGIR (source lines: result tile, its layout -> the extent it covers):"]
        for r in self.launches:
            for job in r.jobs:
                groups: dict[tuple, list[str]] = {}
                for d in job["dots"]:
                    key = (d["function"], tuple(d["tile"]), d["layout"], tuple(d["covers"]), d["replication"])
                    groups.setdefault(key, []).append(str(d["line"]) + (f" ({d['ops']} ops)" if d["ops"] > 1 else ""))
                who = f"{r.label} {job['name']}".strip()
                for (function, tile, layout, covers, replication), where in groups.items():
                    lines.append(f"  {who:<{max(18, len(who) + 1)}}{function}:{','.join(where)}: {tile[0]}x{tile[1]}, "
                                 f"{layout} -> "
                                 f"{covers[0]}x{covers[1]}, x{replication}")
        return "\n".join(lines)


_SHORT = {"registers": "regs", "shared memory": "smem", "threads": "threads", "blocks": "blocks"}


def step_report(recorded: dict, cc: int, *, jobs: int = 2, cache_dir: pathlib.Path | None = None,
                log=None) -> StepReport:
    """Compile the launches of a recorded step (record_step's dict) for sm_`cc` (gpu_build's cache
    first) and analyse each."""
    descs = recorded["launches"]
    results, stats = build(descs, [cc], jobs=jobs, cache_dir=cache_dir, ttgir=True, log=log)
    by_origin = {origin: r for r in results for origin in r["origins"]}
    return StepReport(recorded["variant"], recorded["batch"], cc, recorded["precision"],
                      {k: stats[k] for k in ("triton", "ptxas")},
                      [analyse(d, by_origin[d["origins"][0]], cc) for d in descs],
                      {k: stats[k] for k in ("compiled_kernels", "from_cache", "built")})


# --------------------------------------------------------------------------------------------------
# Recording a training step: the one part of the analysis that builds a model (fastlenet.profiling);
# everything above takes launch descriptions as data.
# --------------------------------------------------------------------------------------------------

_RECORD = """
import json, sys
from fastlenet.kernels.launch import pytorch_precisions
from fastlenet.profiling import step_launches
from fastlenet.models import LeNet5
variant, batch, precision, mode = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
json.dump({"precision": precision or pytorch_precisions(), "mode": mode,
           "parameters": [p.numel() for p in LeNet5(variant).parameters()],
           "launches": step_launches(variant, batch, precision, mode=mode)}, sys.stdout)
"""


def record_step(variant: str, batch: int, precision: str | None = None, mode: str = "train") -> dict:
    """{"variant", "batch", "precision", "launches": [describe dicts]} of one fused training step,
    recorded in a child process through Triton's interpreter on the CPU: this process compiles the
    kernels, and @triton.jit picks interpreter or compiler once, when a kernel is defined. precision
    None: as PyTorch's switches choose in a fresh process (its defaults); "tf32" or "ieee": every dot."""
    if isinstance(precision, str):
        precision = {kind: precision for kind in DOT_KINDS}
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _RECORD, variant, str(batch), json.dumps(precision), mode],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"recording the {variant} step at batch {batch} failed:\n{proc.stderr[-4000:]}")
    return {"variant": variant, "batch": batch, **json.loads(proc.stdout)}


# --------------------------------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    from fastlenet.models import VARIANTS

    parser = argparse.ArgumentParser(prog="python -m fastlenet.analysis.report",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--variant", choices=list(VARIANTS), default="lenet5", help="LeNet-5 variant")
    parser.add_argument("--batch", type=int, default=256, help="training batch size")
    parser.add_argument("--arch", type=int, choices=sorted(GPUS), default=90,
                        help="compute capability compiled for: 90 (H100 SXM), 80 (A100 SXM)")
    parser.add_argument("--precision", choices=("pytorch", "tf32", "ieee"), default="pytorch",
                        help="float32 dots: as PyTorch's default switches choose (TF32 convolutions, IEEE "
                             "matmuls), or every dot in one precision")
    parser.add_argument("--predict", action="store_true",
                        help="predict each launch's time on --gpu with the timing model (predicted, not measured)")
    parser.add_argument("--calibration", action="store_true",
                        help="print the timing model's calibration: each measured row, its prediction, the "
                             "error with that batch size held out, the constants")
    parser.add_argument("--gpu", choices=sorted(GPUS_BY_NAME), default=None,
                        help="GPU to predict for (default: the one --arch names: h100 for 90, a100 for 80)")
    parser.add_argument("--mode", choices=("train", "inference"), default="train",
                        help="with --predict: a training step, or one forward call")
    parser.add_argument("--measurement", type=pathlib.Path, default=predict.MEASUREMENT,
                        help="the GPU measurement the timing model is calibrated on")
    parser.add_argument("--kernels", type=pathlib.Path, default=predict.KERNELS,
                        help="what bench/measured_kernels.py read of the measured kernels")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=default_cache_dir(),
                        help="gpu_build's result cache ($FASTLENET_CACHE_DIR/gpu_build overrides the default)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    precision = None if args.precision == "pytorch" else args.precision
    if args.predict or args.calibration:
        try:
            measurement, kernels = predict.load(args.measurement, args.kernels)
            cal = predict.calibration(measurement, kernels)
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.calibration:
            print(json.dumps(predict.calibration_json(cal, measurement, kernels), indent=1) if args.json
                  else predict.format_calibration(cal, measurement, kernels))
            return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET: the report reads compiled, not interpreted, kernels", file=sys.stderr)
        return 2
    if args.predict:
        gpu = GPUS_BY_NAME[args.gpu] if args.gpu else GPUS[args.arch]
        recorded = record_step(args.variant, args.batch, precision, args.mode)
        p = predict.predicted_step(recorded, gpu, cal.constants, jobs=args.jobs, cache_dir=args.cache_dir,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps(p, indent=1) if args.json else predict.format_prediction(p))
        return 0
    recorded = record_step(args.variant, args.batch, precision)
    report = step_report(recorded, args.arch, jobs=args.jobs, cache_dir=args.cache_dir,
                         log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(report.to_json(), indent=1) if args.json else report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
