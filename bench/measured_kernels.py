"""Compile the kernels a GPU measurement ran, at the commit it ran, and keep what the timing model reads.

    python bench/measured_kernels.py [--commit 62b2439] [--out bench/measured/h100-2026-11-22.kernels.json]

bench/measured/h100-2026-11-22.json timed the fused LeNet-5 step of commit 62b2439 (its child added only
the JSON). That commit's conv_act_pool.py imports launch.PlanCache, which its own launch.py lacks: the
measured working tree held the host helpers that d614423 committed to launch.py (no kernel of the step
lives there), so launch.py is taken from --host-commit. This extracts those sources (git archive:
nothing in the working tree changes),
records its Triton launches through the interpreter at each measured batch size, training and
inference, with float32 dots as the run had them (TF32 convolutions, IEEE matmuls: PyTorch's
defaults, as its meta says), compiles them for sm_90 with this environment's Triton and ptxas, and
writes each launch's resources and per-program SASS work (fastlenet.analysis.step_work). The
calibration (python -m fastlenet.analysis.report --calibration) reads that file, so it needs no
GPU, no checkout of the old commit and no compiler.

The stored file was compiled with the Triton the run used (3.6.0, older than this project
supports), from a side environment that sees this one's packages:

    python -m venv /tmp/v36 && /tmp/v36/bin/pip install --no-deps triton==3.6.0
    echo "import site; site.addsitedir('$(python -c 'import site; print(site.getsitepackages()[0])')')" \
        > /tmp/v36/lib/python3.*/site-packages/zz_fastlenet.pth
    /tmp/v36/bin/python bench/measured_kernels.py
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastlenet.analysis.gpu_build import default_cache_dir  # noqa: E402
from fastlenet.analysis.step_work import aten_launches, launches_work  # noqa: E402
from fastlenet.files import write_json  # noqa: E402

# Run by the old commit's own code (its fastlenet, its kernels as fastlenet.kernels): the launches of
# one training step and one inference call, recorded without running them.
_RECORD = r"""
import json, sys
import torch
from fastlenet.kernels import conv_act_pool, linear_act
from fastlenet.kernels.gpu_build import describe
from fastlenet.kernels.launch import record_launches
from fastlenet.models import LeNet5
from fastlenet.functional import cross_entropy
# As on the measured GPU: PyTorch's defaults, TF32 convolutions and IEEE matmuls.
conv_act_pool.dot_precision = lambda x, kind: "tf32" if x.dtype == torch.float32 else "ieee"
linear_act.dot_precision = lambda x, kind: "ieee"
out = {}
for batch in map(int, sys.argv[1:]):
    model = LeNet5("lenet5", fused=True)
    x, y = torch.empty(batch, 1, 28, 28), torch.zeros(batch, dtype=torch.int64)
    layers = [n for n, _ in model.named_children()]
    with record_launches(execute=False) as train:
        cross_entropy(model(x), y).backward()
    labels = ([f"{n} forward" for n in layers] + ["loss forward", "loss backward"]
              + [f"{n} backward" for n in reversed(layers)])
    with record_launches(execute=False) as infer, torch.inference_mode():
        model(x)
    assert len(train) == len(labels) and len(infer) == len(layers), (train, infer)
    out[batch] = {"train": [describe(l, o) for l, o in zip(train, labels)],
                  "inference": [describe(l, f"{n} forward") for l, n in zip(infer, layers)],
                  "parameters": [p.numel() for p in model.parameters()]}
json.dump(out, sys.stdout)
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="62b2439", help="the commit whose kernels were measured")
    parser.add_argument("--host-commit", default="d614423",
                        help="the commit whose kernels/launch.py (host helpers only) the measured tree had")
    parser.add_argument("--measurement", type=pathlib.Path, default=ROOT / "bench/measured/h100-2026-11-22.json")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench/measured/h100-2026-11-22.kernels.json")
    parser.add_argument("--cc", type=int, default=90, help="compute capability of the measured GPU")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    measured = json.loads(args.measurement.read_text())
    batches = sorted({r["batch_size"] for r in measured["results"] if r["provider"] == "fused-graph"})
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.commit], check=True,
                            capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tree = pathlib.Path(tmp) / "tree"
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        (tree / "kernels" / "launch.py").write_bytes(subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{args.host_commit}:kernels/launch.py"], check=True,
            capture_output=True).stdout)
        # Recording: the old package as `fastlenet`, its kernels/ as fastlenet.kernels (as its install did).
        record = pathlib.Path(tmp) / "record"
        shutil.copytree(tree / "fastlenet", record / "fastlenet")
        shutil.copytree(tree / "kernels", record / "fastlenet" / "kernels")
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(record)}
        proc = subprocess.run([sys.executable, "-c", _RECORD, *map(str, batches)], env=env, cwd=tmp,
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"recording {commit[:7]}'s launches failed:\n{proc.stderr[-3000:]}")
        recorded = json.loads(proc.stdout)
        # Compiling: its kernels under a name of their own, beside this checkout's fastlenet.
        package = f"fastlenet_{commit[:7]}_kernels"
        shutil.copytree(tree / "kernels", pathlib.Path(tmp) / package)
        sys.path.insert(0, tmp)
        rows, toolchain = [], None
        for batch in batches:
            b = recorded[str(batch)]
            for mode in ("train", "inference"):
                descs = [{**d, "module": d["module"].replace("fastlenet.kernels", package)} for d in b[mode]]
                launches, toolchain = launches_work(descs, args.cc, jobs=args.jobs, cache_dir=default_cache_dir(),
                                                    log=lambda line: print(line, file=sys.stderr))
                if mode == "train":
                    launches += aten_launches(b["parameters"])
                rows.append({"batch": batch, "mode": mode, "launches": launches})
                print(f"batch {batch} {mode}: {len(launches)} launches", file=sys.stderr)
    write_json(args.out, {
        "what": "the compiled kernels of a measured fused LeNet-5 step: per launch its resources and each "
                "program's SASS work, read without a GPU; no time here is measured",
        "measurement": args.measurement.name, "commit": commit, "cc": args.cc,
        "launch_py_from": subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.host_commit], check=True,
                                         capture_output=True, text=True).stdout.strip(),
        "precision": {"conv": "tf32", "matmul": "ieee"},
        "toolchain": {k: toolchain[k] for k in ("triton", "ptxas")},
        "measured_with": {k: measured["meta"][k] for k in ("triton", "torch", "gpu")},
        "rows": rows})
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
