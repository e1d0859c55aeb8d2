"""Compile recorded kernel launches for real GPU targets, without a GPU, and read their resources.

Triton's interpreter accepts code that the GPU compiler rejects, and says nothing about registers.
This runs Triton's full pipeline down to ptxas for an explicit target (sm_80, sm_90), then reads
registers, spill (LOCAL/STACK) bytes and shared memory with cuobjdump, both shipped in the triton
wheel. Run it where TRITON_INTERPRET is unset (the kernels must be JITFunctions, not interpreted):

    python -m fastlenet.kernels.gpu_build launches.json      # prints one JSON result per line

launches.json holds a list of {"module", "kernel", "signature", "constexprs", "options"} as
produced by `describe(launch)` from a recorded Launch.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

from .launch import TensorSpec

# Largest shared memory one block may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 166912, 90: 232448}

_TYPES = {"torch.float32": "fp32", "torch.float64": "fp64", "torch.int8": "i8", "torch.int32": "i32",
          "torch.int64": "i64"}


def describe(launch) -> dict:
    """A JSON-able description of a recorded Launch: what triton.compile needs."""
    signature = {}
    for name, value in launch.args.items():
        if isinstance(value, TensorSpec):
            signature[name] = "*" + _TYPES[str(value.dtype)]
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            raise TypeError(f"unsupported argument {name}={value!r}")
    options = {k: v for k, v in launch.meta.items() if k in ("num_warps", "num_stages")}
    constexprs = {k: v for k, v in launch.meta.items() if k not in options}
    return {"module": launch.kernel.fn.__module__, "kernel": launch.kernel.fn.__name__,
            "signature": signature, "constexprs": constexprs, "options": options}


def compile_for(desc: dict, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(desc["module"]), desc["kernel"])
    signature = dict(desc["signature"])
    signature.update({name: "constexpr" for name in desc["constexprs"]})
    src = ASTSource(fn=kernel, signature=signature, constexprs=desc["constexprs"])
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=desc["options"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage.split("Function", 1)[1]))
    return {"kernel": desc["kernel"], "cc": cc, "registers": int(fields["REG"]),
            "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]),
            "shared": max(int(compiled.metadata.shared), int(fields["SHARED"])),
            "shared_limit": SHARED_LIMIT[cc], "constexprs": desc["constexprs"]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET: the GPU build needs compiled, not interpreted, kernels",
              file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        descs = json.load(f)
    targets = [int(cc) for cc in argv[1:]] or [80, 90]
    for desc in descs:
        for cc in targets:
            print(json.dumps(compile_for(desc, cc)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
