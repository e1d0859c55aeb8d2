"""A lower bound on `python -m fastlenet.train --device cpu --epochs 1 --batch-size 64`, as a whole process.

    python bench/cpu_floor.py [--data-dir ./data]

The process does the computation that one CPU epoch at the tutorial setting (batch 64, one epoch,
then the test set) cannot do without, the way fastlenet.train does it, and nothing more: import
torch; read, verify and normalise MNIST (fastlenet.data); the reference LeNet-5's forward pass, loss
and backward pass for the epoch's 938 shuffled batches of 64 (fastlenet.engine.training_step without
an optimizer), in fastlenet.train's CPU layout (engine.channels_last); the forward pass over the
10,000 test images (engine.predict). What it leaves out, every real run adds on top: the optimizer
(and the import of torch._dynamo that torch.optim brings), the running metrics and progress bar, the
metrics file, checkpoint and plot. So its time from interpreter start to exit bounds
fastlenet.train's from below, and any other run built on PyTorch's CPU kernels as well.
bench/cpu_epoch.py runs it beside the two processes it compares and sets it against the time budget.
"""
import argparse
import time

START = time.perf_counter()

# Imported after START on purpose: importing torch is part of every run's cost.
import torch
import torch.nn.functional as F

from fastlenet import data
from fastlenet.engine import channels_last, predict, training_step
from fastlenet.models import LeNet5
from fastlenet.names import DEFAULT_DATA_DIR

BATCH_SIZE = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="where fastlenet keeps MNIST")
    parser.add_argument("--limit-train", type=int, help="first N training images only (for a quick check)")
    args = parser.parse_args()
    marks = {"import": time.perf_counter()}

    cpu = torch.device("cpu")
    dataset = data.load("mnist", args.data_dir, log=lambda line: None)
    mean, std = data.NORMALIZATION["mnist"]
    x, y = data.to_device(dataset.train.first(args.limit_train), cpu, mean, std)
    x_test, y_test = data.to_device(dataset.test, cpu, mean, std)
    torch.manual_seed(0)
    model, x, x_test = channels_last(LeNet5(), x, x_test)  # fastlenet.train's CPU layout
    marks["data"] = time.perf_counter()

    steps = 0
    for xb, yb in data.batches(x, y, BATCH_SIZE, generator=torch.Generator().manual_seed(0)):
        training_step(model, None, F.cross_entropy, xb, yb)  # no optimizer: no update
        steps += 1
    marks["epoch"] = time.perf_counter()

    correct = int((predict(model, x_test).argmax(1) == y_test).sum())
    marks["test"] = time.perf_counter()

    times, last = [], START
    for name, t in marks.items():
        times.append(f"{name} {t - last:.2f} s")
        last = t
    print(f"{steps} steps of {BATCH_SIZE}, {correct} test images right (untrained: no optimizer) | "
          + ", ".join(times))


if __name__ == "__main__":
    main()
