"""The pictures the tools draw: training curves (curves.png), the confusion matrix and a grid of
misclassified images (fastlenet.evaluate), and the figure helpers the benchmarks draw with too.

matplotlib is imported inside new_figure, not at the top: it costs a noticeable fraction of a short
run's start-up, and pyplot's global state is not needed (a Figure on the Agg canvas is enough).
Figures are saved as PNG through fastlenet.files, atomically.
"""
from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

from fastlenet.files import write_bytes

if TYPE_CHECKING:
    import torch

TRAIN_LABEL = "train (running mean over the epoch)"  # measured while the weights changed, not after


def new_figure(**kwargs):
    """A matplotlib Figure on the Agg canvas."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure(path: Path, figure, dpi: int = 110) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    write_bytes(path, buffer.getvalue())


def epoch_ticks(epochs: list[int], most: int = 10) -> list[int]:
    """Whole-number x ticks for `epochs`: the multiples of 1, 2, 5, 10, 20, 50, ... (the smallest step
    that gives at most `most` ticks) from the first epoch to the last. matplotlib's own locator puts
    0.8, 1.0, 1.2 under a single epoch."""
    if not epochs:
        return []
    first, last = min(epochs), max(epochs)
    step = next(m * 10 ** e for e in itertools.count() for m in (1, 2, 5) if (last - first) // (m * 10 ** e) < most)
    return list(range(-(-first // step) * step, last + 1, step))


def plot_curves(history: list[dict], path: Path, title: str = "", best_epoch: int | None = None) -> None:
    """Loss and accuracy per epoch, train vs test (and validation, with --val-split, marking the epoch
    kept as best.pt), side by side."""
    fig = new_figure(figsize=(10, 4), layout="constrained")
    epochs = [h["epoch"] for h in history]
    loss_ax, acc_ax = fig.subplots(1, 2)
    for split, label, style in (("train", TRAIN_LABEL, "o-"), ("val", "validation", "^-."), ("test", "test", "s--")):
        if not all(f"{split}_loss" in h for h in history):
            continue
        loss_ax.plot(epochs, [h[f"{split}_loss"] for h in history], style, label=label)
        acc_ax.plot(epochs, [100 * h[f"{split}_accuracy"] for h in history], style, label=label)
    if best_epoch is not None:
        for ax in (loss_ax, acc_ax):
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best.pt (epoch {best_epoch})")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss", yscale="log")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ticks = epoch_ticks(epochs)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_xticks(ticks)
        if len(ticks) == 1:  # a single epoch: some room on either side instead of a zero-width axis
            ax.set_xlim(ticks[0] - 0.5, ticks[0] + 0.5)
    if title:
        fig.suptitle(title)
    save_figure(path, fig)


def plot_confusion(confusion: torch.Tensor, names: list[str], path: Path, title: str) -> None:
    """The confusion matrix (rows: the true class), each cell's count written in it."""
    k = len(names)
    fig = new_figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    # log colour scale: the diagonal holds ~1000 per class, the errors a handful
    image = ax.imshow(confusion.float().add(1).log10().numpy(), cmap="Blues")
    fig.colorbar(image, ax=ax, label="log10(1 + count)")
    brightest = confusion.max().item()
    for t in range(k):
        for p in range(k):
            n = int(confusion[t, p])
            if n:
                ax.text(p, t, str(n), ha="center", va="center", fontsize=8,
                        color="white" if n > brightest ** 0.5 * 4 else "black")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title=title)
    words = max(map(len, names)) > 2  # class names, not digits: slant them
    ax.set_xticklabels(names, rotation=45 if words else 0, ha="right" if words else "center")
    ax.set_yticklabels(names)
    save_figure(path, fig)


def plot_misclassified(images: torch.Tensor, truth: torch.Tensor, predicted: torch.Tensor, which: torch.Tensor,
                       names: list[str], path: Path, total: int | None = None) -> None:
    """A grid of the misclassified images `which` (test-set indices), each titled '#index: pred X /
    true Y', under a title saying how many of the `total` misclassified images (default: all) it shows."""
    n = len(which)
    total = n if total is None else total
    cols = min(8, max(n, 1))
    rows = max(1, -(-n // cols))
    fig = new_figure(figsize=(1.5 * cols, 1.7 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, which.tolist()):
        ax.imshow(images[i].numpy(), cmap="gray_r")
        ax.set_title(f"#{i}: pred {names[predicted[i]]}\ntrue {names[truth[i]]}", fontsize=8, color="firebrick")
    if n == 0:
        axes[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle(f"misclassified test images: {n:,} of {total:,} shown" if total else
                 "misclassified test images: none")
    save_figure(path, fig)


def plot_prototypes(path: Path) -> None:
    """The 1998 LeNet-5's ten output prototypes (fastlenet.lenet1998.PROTOTYPES), each its 7x12 bitmap,
    +1 black: docs/lenet1998-prototypes.png is this picture."""
    from fastlenet.lenet1998 import PROTOTYPE_SHAPE, PROTOTYPES

    fig = new_figure(figsize=(8, 1.9), layout="constrained")
    for digit, ax in enumerate(fig.subplots(1, len(PROTOTYPES))):
        ax.imshow(PROTOTYPES[digit].view(PROTOTYPE_SHAPE).numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(str(digit))
    fig.suptitle("lenet5-1998: the output's fixed prototypes (7x12, +-1), drawn for fastlenet")
    save_figure(path, fig)
