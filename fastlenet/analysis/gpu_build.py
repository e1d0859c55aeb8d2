"""Compile recorded kernel launches for real GPU targets, without a GPU, and read their resources.

Triton's interpreter accepts code that the GPU compiler rejects, and says nothing about registers.
This runs Triton's full pipeline down to ptxas for an explicit target (sm_80, sm_90), then reads
registers, spill (LOCAL/STACK) bytes and shared memory with cuobjdump, both shipped in the triton
wheel. Run it where TRITON_INTERPRET is unset (the kernels must be JITFunctions, not interpreted):

    python -m fastlenet.analysis.gpu_build launches.json [--cc 80 90] [--jobs 2] [--report FILE]

launches.json holds a list of fastlenet.kernels.launch.describe(launch) dicts (kernel, grid,
arguments, constexprs) of recorded Launches. Each result (one JSON line on stdout) is one distinct
compiled kernel per target.

What is compiled is what the JIT would compile, because the JIT itself decides it: `specialize`
hands the recorded arguments to the kernel's own launch path (JITFunction.run with warmup=True)
under a stand-in driver for the target, and keeps the specialisation data the JIT serialises for
its cache hook (integers equal to 1 become constexprs, integers and pointers divisible by 16 get
tt.divisibility, i32 vs i64 by value, do_not_specialize honoured); `compile_for` compiles that with
JITFunction.preload, the JIT's own path from serialised data to ASTSource and triton.compile. A
reimplementation of those rules would drift from Triton; this cannot. Results are cached by
specialisation, target, toolchain and the JIT's hash of each kernel's sources ($FASTLENET_CACHE_DIR,
default ~/.cache/fastlenet), so only an edited kernel is rebuilt; each result's TTGIR is kept beside it
(gzip), for readers of the compiled layouts (report.py).
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import importlib
import json
import multiprocessing
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterable

from fastlenet.files import atomic_write_bytes, write_bytes, write_json


@dataclass(frozen=True)
class SmLimits:
    """What one SM of a compute capability holds, and how CUDA allocates it, as cuda_occupancy.h
    (in Triton's wheel: triton/backends/nvidia/include) states it for 8.0 and 9.0."""
    shared: int  # sharedMemPerMultiprocessor, bytes, at the largest shared-memory carveout
    registers: int = 65536  # regsPerMultiprocessor, also the most one block may hold
    reserved_shared: int = 1024  # reservedSharedMemPerBlock: the driver's share of every block
    shared_granularity: int = 128  # cudaOccSMemAllocationGranularity
    register_granularity: int = 256  # cudaOccRegAllocationGranularity: registers per warp, rounded up
    sub_partitions: int = 4  # cudaOccSubPartitionsPerMultiprocessor: registers are allocated per quarter
    max_blocks: int = 32  # cudaOccMaxBlocksPerMultiprocessor
    max_threads: int = 2048  # maxThreadsPerMultiprocessor


# sm_80 (A100): 164 KiB of shared memory per SM; sm_90 (H100): 228 KiB.
SM_LIMITS = {80: SmLimits(shared=164 * 1024), 90: SmLimits(shared=228 * 1024)}
# Largest shared memory one block may use (the opt-in maximum, sharedMemPerBlockOptin), bytes.
SHARED_LIMIT = {cc: sm.shared - sm.reserved_shared for cc, sm in SM_LIMITS.items()}
# Bump when a cached result's meaning or fields change.
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------------------
# Descriptions (fastlenet.kernels.launch.describe): what a launch passed, nothing Triton-specific yet.
# --------------------------------------------------------------------------------------------------

def merge_descriptions(descs: Iterable[dict]) -> list[dict]:
    """Equal descriptions once, with the origins of all of them."""
    merged: dict[str, dict] = {}
    for desc in descs:
        key = json.dumps({k: v for k, v in desc.items() if k != "origins"}, sort_keys=True)
        if key in merged:
            merged[key]["origins"] += [o for o in desc["origins"] if o not in merged[key]["origins"]]
        else:
            merged[key] = json.loads(json.dumps(desc))
    return list(merged.values())


# --------------------------------------------------------------------------------------------------
# Description -> the JIT's own specialisation for a target, and its compilation.
# --------------------------------------------------------------------------------------------------

class _Pointer:
    """Stands in for a tensor argument: what the JIT's specialisation reads of one (dtype, data_ptr)."""

    def __init__(self, dtype: str, data_ptr_mod16: int):
        import torch

        self.dtype = getattr(torch, dtype)
        self._data_ptr = data_ptr_mod16

    def data_ptr(self) -> int:
        return self._data_ptr


class _TargetDriver:
    """The part of a Triton driver that JITFunction.run/preload ask for, answering for a target
    with no GPU present. Its device id is private, so the real device's kernel cache is untouched."""

    def __init__(self, cc: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cc, 32)
        self.device = f"fastlenet.gpu_build:sm_{cc}"

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def jit_function(module: str, name: str):
    """The @triton.jit kernel `name` of `module`, checked to be a JITFunction this build can drive."""
    kernel = getattr(importlib.import_module(module), name)
    for needed in ("run", "preload", "device_caches"):
        if not hasattr(kernel, needed):
            import triton

            raise RuntimeError(
                f"{module}.{name} is a {type(kernel).__name__} without .{needed}: the GPU build needs "
                f"Triton's JITFunction (is TRITON_INTERPRET set?) with run/preload/device_caches, as in "
                f"Triton 3.6-3.9; this is Triton {triton.__version__}")
    return kernel


@contextlib.contextmanager
def _as_target(kernel, cc: int, cache_hook):
    """Run the JIT's launch path as if a GPU of compute capability `cc` were current, with Triton's
    jit_cache_hook set to `cache_hook` (called with what would be compiled; True skips compiling)."""
    from triton import knobs
    from triton.runtime.driver import driver

    if not hasattr(knobs, "runtime") or not hasattr(knobs.runtime, "jit_cache_hook"):
        raise RuntimeError("this Triton has no knobs.runtime.jit_cache_hook; the GPU build needs "
                           "Triton 3.6-3.9")
    stand_in = _TargetDriver(cc)
    try:
        previous = driver.active
    except RuntimeError:  # no GPU on this machine: nothing to restore, the default stays unset
        previous = None
    previous_hook = knobs.runtime.jit_cache_hook
    driver.set_active(stand_in)
    knobs.runtime.jit_cache_hook = cache_hook
    try:
        yield
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        driver.set_active(previous)
        kernel.device_caches.pop(stand_in.device, None)


def _arguments(desc: dict) -> dict:
    return {name: _Pointer(v["dtype"], v["data_ptr_mod16"]) if isinstance(v, dict) else v
            for name, v in desc["args"].items()}


def specialize(desc: dict, cc: int) -> dict:
    """What the JIT compiles when `desc` is launched on a GPU of compute capability `cc`: its
    serialised specialisation data (signature, constexprs, attrs, options, target) and cache key."""
    kernel = jit_function(desc["module"], desc["kernel"])
    seen = {}

    def capture(*, key, compile, **_):
        seen.update(key=key, data=compile["specialization_data"])
        return True  # skip compiling: only the decision is wanted here

    with _as_target(kernel, cc, capture):
        kernel.run(grid=tuple(desc["grid"]), warmup=True, **_arguments(desc), **desc["meta"])
    if not seen:
        raise RuntimeError(f"{desc['kernel']}: the JIT did not reach its cache hook; this Triton's "
                           f"launch path differs from 3.6-3.9's")
    # The JIT's hash of the kernel's source and of every @triton.jit function it calls (what Triton's
    # own cache is keyed on): editing a kernel, or a helper it calls, rebuilds that kernel only.
    return {"module": desc["module"], "kernel": desc["kernel"], "cc": cc, "key": str(seen["key"]),
            "data": seen["data"], "source": kernel.cache_key}


def compile_for(spec: dict):
    """Compile a `specialize` result with the JIT's own path (JITFunction.preload: the serialised
    data -> ASTSource(fn, signature, constexprs, attrs) -> triton.compile). Returns Triton's
    CompiledKernel (asm: ttir, ttgir, llir, ptx, cubin; hash)."""
    kernel = jit_function(spec["module"], spec["kernel"])
    with _as_target(kernel, spec["cc"], None):
        return kernel.preload(spec["data"])


def jit_compile(desc: dict, cc: int):
    """Compile `desc` for `cc` through the JIT's launch path itself (JITFunction.run, warmup): the
    reference that compile_for(specialize(desc, cc)) reproduces, as the tests check."""
    kernel = jit_function(desc["module"], desc["kernel"])
    with _as_target(kernel, cc, None):
        return kernel.run(grid=tuple(desc["grid"]), warmup=True, **_arguments(desc), **desc["meta"])


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def toolchain() -> dict:
    """Versions that decide what the build produces: Triton's and its ptxas's."""
    import triton

    ptxas = _tool("ptxas")
    out = subprocess.run([ptxas, "--version"], check=True, capture_output=True, text=True).stdout
    release = re.search(r"release [^\n]*", out)
    return {"triton": triton.__version__, "ptxas": release.group(0) if release else out.strip(),
            "ptxas_path": ptxas}


def resources(compiled, cc: int) -> dict:
    """Registers, spill bytes (STACK, LOCAL) and shared memory of a compiled kernel, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
    # One block per function; a kernel with non-inlined callees has several, and a spill in any
    # of them is a spill.
    functions = re.findall(r"Function ([^:\s]+):\s*\n\s*(.*)", usage)
    fields = {name: dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)) for name, line in functions}
    entry = fields.get(compiled.metadata.name) or next(iter(fields.values()))
    return {"registers": int(entry["REG"]),
            "stack": max(int(f["STACK"]) for f in fields.values()),
            "local": max(int(f["LOCAL"]) for f in fields.values()),
            "shared": max(int(compiled.metadata.shared), int(entry["SHARED"])),
            "shared_limit": SHARED_LIMIT.get(cc)}


def _summary(spec: dict) -> dict:
    """The readable part of a specialisation: constexprs by name (the kernel's meta-parameters and
    the integers the JIT turned into constexprs) and the arguments it marked divisible by 16."""
    data = json.loads(spec["data"])
    names = list(data["signature"])
    constexprs = {names[k[0]]: v for k, v in zip(data["constant_keys"], data["constant_vals"]) if len(k) == 1}
    divisible = [names[k[0]] for k, v in zip(data["attrs_keys"], data["attrs_vals"])
                 if len(k) == 1 and ["tt.divisibility", 16] in v]
    return {"constexprs": constexprs, "divisible_by_16": divisible,
            "num_warps": data["options"]["num_warps"], "num_stages": data["options"]["num_stages"]}


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin as nvdisasm prints it, each instruction under the source lines it came
    from with their inlining chain (-gi; Triton compiles with line info unless
    TRITON_DISABLE_LINE_INFO is set)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("nvdisasm"), "-c", "-gi", f.name], check=True, capture_output=True,
                              text=True).stdout


def _build_one(spec: dict, sass: bool) -> dict:
    compiled = compile_for(spec)
    result = {**resources(compiled, spec["cc"]), "hash": compiled.hash, "ttgir": compiled.asm["ttgir"]}
    if sass:  # a third of a second a kernel: only where it is read
        result["sass"] = disassemble(compiled.asm["cubin"])
        result["ptx"] = compiled.asm["ptx"]
    return result


def _worker(conn) -> None:
    """A compile process: build each spec it receives; a failure is a result, not a crash."""
    import traceback

    # Its own process group, so that stopping it also stops the ptxas it may be running; and if the
    # build itself is killed (a test timeout), the group goes with it (Linux: parent-death signal).
    os.setpgrp()
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the build was stopped
            return
        if job is None:
            return
        try:
            result = _build_one(*job)
        except Exception:  # noqa: BLE001 - a configuration that fails to build is a result, not a crash
            result = {"error": traceback.format_exc(limit=-3).strip()}
        conn.send(result)


# --------------------------------------------------------------------------------------------------
# Many descriptions -> deduplicated, cached, parallel builds.
# --------------------------------------------------------------------------------------------------

def default_cache_dir() -> pathlib.Path:
    if os.environ.get("FASTLENET_CACHE_DIR"):
        return pathlib.Path(os.environ["FASTLENET_CACHE_DIR"]) / "gpu_build"
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "fastlenet" / "gpu_build"


def cache_key(spec: dict, tools: dict) -> str:
    """Key of a build result: the specialisation (signature, constexprs, attrs, options, target),
    the kernel's source hash, the toolchain, and the environment variables Triton's own cache
    treats as changing compilation."""
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars
        env = get_cache_invalidating_env_vars()
    except ImportError:
        env = {}
    blob = json.dumps({"format": _CACHE_FORMAT, "data": spec["data"], "cc": spec["cc"], "source": spec["source"],
                       "tools": tools, "env": env}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _build_all(specs: dict[str, dict], jobs: int, timeout: float, sass: bool = False):
    """Yield (key, result) for every spec as each finishes, in `jobs` spawned processes (a forked
    copy of a process holding Triton's and torch's state is unsafe). A compile that runs past
    `timeout` seconds is stopped and reported: a kernel edit that sends ptxas into minutes of
    spilling must fail the build with its name, not hang it."""
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")
    todo = list(specs.items())
    busy = {}  # connection -> (process, key, started)

    def start_worker():
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_worker, args=(child,), daemon=True)
        process.start()
        return parent, process

    idle = [start_worker() for _ in range(min(jobs, len(todo)))]
    try:
        while todo or busy:
            while todo and idle:
                conn, process = idle.pop()
                key, spec = todo.pop(0)
                conn.send((spec, sass))
                busy[conn] = (process, key, time.monotonic())
            for conn in wait(list(busy), timeout=1.0):
                process, key, _ = busy.pop(conn)
                try:
                    result = conn.recv()
                except EOFError:  # the worker died (out of memory, a crash in native code)
                    result = {"error": f"compile process died (exit code {process.exitcode})"}
                    process.join()
                    conn, process = start_worker()
                idle.append((conn, process))
                yield key, result
            now = time.monotonic()
            for conn, (process, key, started) in list(busy.items()):
                if now - started > timeout:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.join()
                    del busy[conn]
                    idle.append(start_worker())
                    yield key, {"error": f"compile took longer than {timeout:g} s (stopped)"}
    finally:
        for conn, process in idle + [(c, p) for c, (p, _, _) in busy.items()]:
            if process.is_alive():
                with contextlib.suppress(OSError):
                    conn.send(None)
                process.join(timeout=5)
                if process.is_alive():
                    process.kill()


# The texts a build keeps beside each result (gzip), for readers of the compiled code: the TTGIR
# (report.py: layouts, dots, loops), the SASS and the PTX ptxas was given (programs.py: instructions per
# loop trip, and which loops ptxas unrolled).
TEXTS = ("ttgir", "sass", "ptx")


def _from_cache(cache_dir: pathlib.Path | None, key: str, texts: Iterable[str]) -> dict | None:
    """The cached result of `key` (with the texts asked for), or None where it or one of the texts
    is missing: a result cached before a text was kept beside it is rebuilt when that text is wanted."""
    if not cache_dir or not (cache_dir / f"{key}.json").exists():
        return None
    result = json.loads((cache_dir / f"{key}.json").read_text())
    for text in texts:
        try:
            result[text] = gzip.decompress((cache_dir / f"{key}.{text}.gz").read_bytes()).decode()
        except (OSError, EOFError):  # absent, or cut short
            return None
    return result


def build(descs: list[dict], ccs: Iterable[int], *, jobs: int = 2, cache_dir: pathlib.Path | None = None,
          timeout: float = 300, log=None, ttgir: bool = False, sass: bool = False) -> tuple[list[dict], dict]:
    """Specialise every description for every target, compile each distinct specialisation once
    (cache first, then `jobs` processes) and return (results, stats). A result is one compiled
    kernel: its resources, its readable specialisation, the origins of every launch that compiles
    to it and, with ttgir=True / sass=True, its TTGIR / SASS text ("ttgir", "sass")."""
    wanted = [name for name, want in (("ttgir", ttgir), ("sass", sass), ("ptx", sass)) if want]
    started = time.perf_counter()
    ccs = list(ccs)
    tools = toolchain()
    groups: dict[str, dict] = {}
    for desc in descs:
        for cc in ccs:
            spec = specialize(desc, cc)
            key = cache_key(spec, tools)
            group = groups.setdefault(key, {"spec": spec, "origins": []})
            group["origins"] += [o for o in desc.get("origins", []) if o not in group["origins"]]
    specialised = time.perf_counter()

    built, todo = {}, []
    for key in groups:
        result = _from_cache(cache_dir, key, wanted)
        if result is None:
            todo.append(key)
        else:
            built[key] = result
    cached = len(built)
    if todo:
        if cache_dir:
            cache_dir.mkdir(parents=True, exist_ok=True)
        jobs = max(1, min(jobs, len(todo)))
        specs = {k: groups[k]["spec"] for k in todo}
        for n, (key, result) in enumerate(_build_all(specs, jobs, timeout, "sass" in wanted), 1):
            texts = {name: result.pop(name, None) for name in TEXTS}
            # A timeout or crash may not repeat (a busy machine); compile errors are not cached either,
            # so fixing the cause needs no cache flush. The texts first: a result's JSON is what
            # marks it cached.
            if cache_dir and "error" not in result:
                for name, text in texts.items():
                    if text is not None:
                        atomic_write_bytes(cache_dir / f"{key}.{name}.gz", gzip.compress(text.encode()))
                atomic_write_bytes(cache_dir / f"{key}.json", json.dumps(result).encode())
            built[key] = {**result, **{name: texts[name] for name in wanted if texts[name] is not None}}
            if log:
                spec = groups[key]["spec"]
                log(f"[{n}/{len(todo)}] {spec['kernel']} sm_{spec['cc']}: " + (
                    f"ERROR {result['error'].splitlines()[-1]}" if "error" in result else
                    f"{result['registers']} registers, stack {result['stack']} B, local {result['local']} B"))

    results = []
    for key, group in groups.items():
        spec = group["spec"]
        results.append({"kernel": spec["kernel"], "cc": spec["cc"], **built[key], **_summary(spec),
                        "origins": group["origins"], "key": key[:16]})
    stats = {**tools, "descriptions": len(descs), "targets": ccs, "compiled_kernels": len(groups),
             "from_cache": cached, "built": len(todo), "jobs": jobs,
             "specialize_seconds": round(specialised - started, 2),
             "seconds": round(time.perf_counter() - started, 2)}
    return results, stats


def failures(results: list[dict]) -> list[dict]:
    """Results that did not build, spill (any LOCAL or STACK bytes) or need more shared memory than
    the target has."""
    return [r for r in results if "error" in r or r["local"] or r["stack"]
            or (r["shared_limit"] is not None and r["shared"] > r["shared_limit"])]


def describe_result(r: dict, max_origins: int = 3) -> str:
    """One line a person can act on: which kernel, which variant, where it comes from, what it uses."""
    meta = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
    origins = "; ".join(r["origins"][:max_origins])
    if len(r["origins"]) > max_origins:
        origins += f"; +{len(r['origins']) - max_origins} more"
    if "error" in r:
        usage = f"DID NOT BUILD: {r['error'].splitlines()[-1]}"
    else:
        usage = (f"registers {r['registers']}, stack {r['stack']} B, local {r['local']} B, "
                 f"shared {r['shared']}/{r['shared_limit']} B")
    return (f"{r['kernel']} sm_{r['cc']}: {usage}, num_warps {r['num_warps']} | {meta} | "
            f"divisible by 16: {', '.join(r['divisible_by_16']) or '-'} | from: {origins or '?'}")


def report(results: list[dict], stats: dict) -> str:
    """The build report: toolchain, every failing configuration, and the most registers any
    configuration of each kernel needs per target (the headroom left before spilling)."""
    bad = failures(results)
    lines = [f"GPU build: Triton {stats['triton']}, ptxas {stats['ptxas']}",
             f"{stats['descriptions']} launch descriptions -> {stats['compiled_kernels']} distinct compiled "
             f"kernels for sm_{', sm_'.join(map(str, stats['targets']))} ({stats['from_cache']} from cache, "
             f"{stats['built']} built with {stats['jobs']} processes) in {stats['seconds']} s",
             "", f"FAILING (did not build, spills, or shared memory over the limit): {len(bad)}"]
    lines += [describe_result(r, max_origins=6) for r in sorted(bad, key=lambda r: (r["kernel"], r["cc"]))]
    lines += ["", "Max registers per kernel and target (of 255 per thread):"]
    peaks: dict[tuple[str, int], dict] = {}
    for r in results:
        if "error" in r:
            continue
        k = (r["kernel"], r["cc"])
        if k not in peaks or r["registers"] > peaks[k]["registers"]:
            peaks[k] = r
    for (kernel, cc), r in sorted(peaks.items()):
        count = sum(1 for x in results if (x["kernel"], x["cc"]) == (kernel, cc))
        lines.append(f"  {kernel:30s} sm_{cc}: {r['registers']:3d}  ({count} configurations; max at "
                     f"{', '.join(f'{k}={v}' for k, v in r['constexprs'].items() if not k.startswith('stride'))})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlenet.analysis.gpu_build",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("launches", help="JSON list of fastlenet.kernels.launch.describe(launch) dicts")
    parser.add_argument("--cc", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="compile processes (each holds torch and Triton: about 1 GB of memory)")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=default_cache_dir(),
                        help="result cache ($FASTLENET_CACHE_DIR/gpu_build overrides the default)")
    parser.add_argument("--no-cache", action="store_true", help="build everything, read and write no cache")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one compile may take before it "
                        "is stopped and reported as failing")
    parser.add_argument("--report", type=pathlib.Path, help="write the human-readable report here")
    parser.add_argument("--stats", type=pathlib.Path, help="write the build statistics (JSON) here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET: the GPU build needs compiled, not interpreted, kernels",
              file=sys.stderr)
        return 2
    with open(args.launches) as f:
        descs = merge_descriptions(json.load(f))
    results, stats = build(descs, args.cc, jobs=args.jobs, cache_dir=None if args.no_cache else args.cache_dir,
                           timeout=args.timeout, log=lambda line: print(line, file=sys.stderr, flush=True))
    for r in results:
        print(json.dumps(r))
    text = report(results, stats)
    if args.report:
        write_bytes(args.report, text.encode())
    if args.stats:
        write_json(args.stats, stats)
    print(text, file=sys.stderr)
    return 1 if failures(results) else 0


if __name__ == "__main__":
    sys.exit(main())
