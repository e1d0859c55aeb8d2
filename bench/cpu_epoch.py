"""One MNIST epoch on the CPU, whole process, side by side: a typical DataLoader script vs fastlenet.train.

    python bench/cpu_epoch.py [--repeats 3] [--data-dir ./data] [--json results.json]

bench/dataloader_mnist.py is LeNet-5 on MNIST the way the usual PyTorch tutorial writes it
(torchvision's MNIST dataset through a DataLoader). Both run as fresh subprocesses at that script's
setting (batch 64, Adam 1e-3, no schedule, one epoch, then the test set), and the clock covers each
whole process: interpreter start, imports, data loading, training, testing and (for fastlenet)
writing its metrics, checkpoint and plot. After one untimed warm-up of each (file cache, bytecode),
the two alternate, in swapped order every repeat, so a change in machine load falls on both.
Reported: the median, min and max seconds of each, and the ratio of medians. The goal set for
fastlenet: at most 1/2.5 of the DataLoader script's time.

A third process, bench/cpu_floor.py, runs beside them: fastlenet.train's run less everything that
is not computation it cannot do without (no optimizer, metrics or outputs: import torch, data,
forward + loss + backward for 938 batches, the test set). Its time bounds fastlenet's from below and
is set against the budget (the DataLoader script's median / 2.5).

The load average is recorded with every run: on a shared machine other processes compete for the
cores, and PyTorch's intra-op threads degrade badly when a core is taken, so a busy machine shows
up as a high load average next to an outlier.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 2.5


def commands(data_dir: str, out_dir: str) -> dict[str, list[str]]:
    return {
        "dataloader": [sys.executable, str(REPO / "bench" / "dataloader_mnist.py"), "--data-dir", data_dir],
        "fastlenet": [sys.executable, "-m", "fastlenet.train", "--device", "cpu", "--epochs", "1",
                      "--batch-size", "64", "--optimizer", "adam", "--lr", "1e-3", "--schedule", "none",
                      "--data-dir", data_dir, "--out", out_dir, "--overwrite"],  # one --out, every repeat
        "floor": [sys.executable, str(REPO / "bench" / "cpu_floor.py"), "--data-dir", data_dir],
    }


ACCURACY = {  # how each prints its final test accuracy
    "dataloader": re.compile(r"test accuracy: ([\d.]+)%"),
    "fastlenet": re.compile(r"final test accuracy ([\d.]+)%"),
}


def run_once(name: str, cmd: list[str], env: dict) -> dict:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed with exit status {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    match = ACCURACY[name].search(proc.stdout) if name in ACCURACY else None
    return {"provider": name, "seconds": seconds, "load_average_before": load_before,
            "test_accuracy": float(match.group(1)) / 100 if match else None}


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    import torchvision

    return {"cpu": cpu, "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "platform": platform.platform(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name] + sys.argv)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each first")
    parser.add_argument("--data-dir", default=str(REPO / "data"), help="MNIST in torchvision's layout")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from fastlenet import data
    from fastlenet.files import write_json

    data.load("mnist", args.data_dir)  # fetch and verify now, so no timed run downloads anything
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    info = machine()
    print(f"{info['cpu']}, {info['usable_cpus']} cores | torch {info['torch']} | python {info['python']}")

    runs = []
    with tempfile.TemporaryDirectory() as out:
        cmds = commands(str(Path(args.data_dir).resolve()), out)
        order = list(cmds)
        for i in range(args.warmup + args.repeats):
            for name in order if i % 2 == 0 else order[::-1]:
                result = run_once(name, cmds[name], env)
                timed = i >= args.warmup
                label = f"repeat {i - args.warmup + 1}" if timed else "warm-up"
                acc = f"{result['test_accuracy']:.2%}" if result["test_accuracy"] is not None else "-"
                print(f"{label:>9}  {name:<10} {result['seconds']:6.2f} s  test accuracy {acc:>6}  "
                      f"(load average {result['load_average_before']:.2f})", flush=True)
                if timed:
                    runs.append(dict(result, repeat=i - args.warmup + 1))

    summary = {}
    for name in cmds:
        times = [r["seconds"] for r in runs if r["provider"] == name]
        summary[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
    ratio = summary["dataloader"]["median_s"] / summary["fastlenet"]["median_s"]
    summary["ratio_dataloader_over_fastlenet"] = ratio
    summary["target_ratio"] = TARGET_RATIO
    summary["meets_target"] = ratio >= TARGET_RATIO
    budget = summary["dataloader"]["median_s"] / TARGET_RATIO
    summary["budget_s"] = budget
    summary["floor_within_budget"] = summary["floor"]["median_s"] <= budget
    print()
    for name in cmds:
        s = summary[name]
        print(f"{name:<10} median {s['median_s']:6.2f} s  (min {s['min_s']:.2f}, max {s['max_s']:.2f})")
    print(f"fastlenet takes 1/{ratio:.2f} of the DataLoader script's time "
          f"(target: 1/{TARGET_RATIO} or less) -> {'met' if ratio >= TARGET_RATIO else 'NOT met'}")
    floor = summary["floor"]["median_s"]
    if not summary["floor_within_budget"]:
        print(f"the floor alone (import torch, data, forward + loss + backward, test set; no optimizer, no "
              f"outputs) takes {floor:.2f} s, more than the budget of {budget:.2f} s")
    else:
        print(f"the floor takes {floor:.2f} s of the {budget:.2f} s budget, leaving {budget - floor:.2f} s for "
              f"the optimizer, the metrics and the outputs")
    if args.json:
        write_json(Path(args.json), {"meta": info, "runs": runs, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
