"""The work of every launch of one step, from compiled code: what the timing model reads.

For each recorded Triton launch (a launch.describe dict): its compiled kernel's resources (gpu_build)
and each program's SASS work (programs.py); its compulsory bytes (every tensor argument once); and
for a training step the optimizer's ATen kernels, which have no Triton source to read (see
aten_launches). Nothing here is a time: timing.py turns this into one.
"""
from __future__ import annotations

import math
import pathlib

from .gpu_build import build
from .programs import launch_work

_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1}


def tensor_bytes(desc: dict) -> int:
    """Bytes of every tensor argument once (read or written): the compulsory traffic. An argument
    passed twice (a stand-in pointer for an absent tensor) is counted twice; such stand-ins are
    small (a bias) or never touched."""
    return sum(math.prod(v["shape"]) * _ITEMSIZE[v["dtype"]] for v in desc["args"].values() if isinstance(v, dict))


def launches_work(descs: list[dict], cc: int, *, jobs: int = 2, cache_dir: pathlib.Path | None = None,
                  log=None) -> tuple[list[dict], dict]:
    """(one dict per launch: label, kernel, registers, shared, num_warps, bytes, work; build stats)."""
    results, stats = build(descs, [cc], jobs=jobs, cache_dir=cache_dir, ttgir=True, sass=True, log=log)
    by_origin = {origin: r for r in results for origin in r["origins"]}
    out = []
    for d in descs:
        r = by_origin[d["origins"][0]]
        if "error" in r:
            raise RuntimeError(f"{d['kernel']} ({d['origins'][0]}) did not build for sm_{cc}: "
                               f"{r['error'].splitlines()[-1]}")
        w = launch_work(d, r["ttgir"], r["sass"], r["num_warps"], r["ptx"])
        out.append({"label": d["origins"][0], "kernel": d["kernel"], "registers": r["registers"],
                    "shared": r["shared"], "num_warps": r["num_warps"], "bytes": tensor_bytes(d),
                    "work": w.to_json()})
    return out, {k: stats[k] for k in ("triton", "ptxas", "compiled_kernels", "from_cache", "built")}


# PyTorch's multi-tensor apply (ATen/native/cuda/MultiTensorApply.cuh): chunks of 65,536 elements,
# 512 threads a block, 4 elements a thread per trip; one block per chunk.
_CHUNK, _BLOCK, _ILP = 65536, 512, 4


def aten_launches(parameter_sizes: list[int]) -> list[dict]:
    """The ATen kernels of a fused training step with Adam(fused=True, capturable=True): the loss's
    seed gradient (ones_like), the step counters' increment (_foreach_add_) and _fused_adam_. No
    SASS is read for them: each is one dependent memory wait per trip of its longest block (for
    Adam, the trips over its largest chunk: PyTorch's multi-tensor-apply constants above), and
    its bytes (Adam reads param, grad, both moments and writes three of them, 7 x 4 bytes an element)."""
    elements = sum(parameter_sizes)
    adam_trips = math.ceil(min(max(parameter_sizes), _CHUNK) / (_BLOCK * _ILP))
    return [
        {"label": "loss seed gradient", "kernel": "ones_like (ATen)", "aten": True, "dependent": 1, "bytes": 4},
        {"label": "Adam step counters", "kernel": "_foreach_add_ (ATen)", "aten": True, "dependent": 1,
         "bytes": 8 * len(parameter_sizes)},
        {"label": "Adam", "kernel": "_fused_adam_ (ATen)", "aten": True, "dependent": adam_trips,
         "bytes": 28 * elements},
    ]
