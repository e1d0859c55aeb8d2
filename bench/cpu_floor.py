"""A lower bound on one CPU training epoch of LeNet-5 on PyTorch's kernels, as a whole process.

    python bench/cpu_floor.py [--steps 938] [--batch-size 64]

The process imports torch and runs the reference LeNet-5's forward and backward passes for one MNIST
epoch's worth of batches (938 of 64) on random images, in the channels-last layout that
fastlenet.train uses on the CPU (the faster one there), with torch's default threads, and does
nothing else: no optimizer, no data loading or verification, no loss, no test set, no metrics,
checkpoint or plot. Any training run built on PyTorch's CPU kernels does all of this work and more,
so this process's time from interpreter start to exit bounds `python -m fastlenet.train --device cpu
--epochs 1 --batch-size 64` from below. bench/cpu_epoch.py runs it beside the two processes it
compares and sets it against issue 2's time budget.
"""
import argparse
import time

START = time.perf_counter()

import torch  # noqa: E402  (timed: importing torch is part of every run's cost)

from fastlenet.models import LeNet5  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=938, help="batches: 60,000 / 64 rounded up")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    imported = time.perf_counter()
    torch.manual_seed(0)
    layout = torch.channels_last
    model = LeNet5().to(memory_format=layout)
    images = torch.randn(args.batch_size, 1, 28, 28).contiguous(memory_format=layout)
    grad_logits = torch.ones(args.batch_size, 10)  # stands in for the loss gradient; made once
    for _ in range(args.steps):
        model(images).backward(grad_logits)
    done = time.perf_counter()
    print(f"import torch and fastlenet {imported - START:.2f} s, {args.steps} forward+backward steps of "
          f"{args.batch_size} {done - imported:.2f} s ({1000 * (done - imported) / args.steps:.2f} ms/step)")


if __name__ == "__main__":
    main()
