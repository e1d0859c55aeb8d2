"""Evaluate a trained checkpoint: python -m fastlenet.evaluate CHECKPOINT [flags] (see --help).

Prints the test accuracy and the accuracy of each class, and writes into --out (by default the
checkpoint's directory): evaluation.json, confusion_matrix.png, and misclassified.png, a grid of
test images the model gets wrong, each titled with its test-set index and its predicted and true
label. Only the test split is read, by default from the data directory the run trained from: the
training files need not be there.

As in fastlenet.train, PyTorch is imported only once the flags are good, so --help answers at once.
The checkpoint is read by fastlenet.checkpoint, the model run by fastlenet.engine, the pictures drawn
by fastlenet.plots.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastlenet import cli
from fastlenet.checkpoint import checkpoint_model, load_checkpoint
from fastlenet.files import write_json
from fastlenet.names import DATASET_NAMES, DEFAULT_DATA_DIR, EVAL_BATCH_SIZE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlenet.evaluate",
                                description="Evaluate a fastlenet checkpoint on the test set.",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint.pt or best.pt written by fastlenet.train")
    p.add_argument("--dataset", choices=DATASET_NAMES, help="default: the dataset the checkpoint was trained on")
    p.add_argument("--data-dir", metavar="DIR",
                   help="where the dataset is kept (default: the data directory of the checkpoint's run if it "
                        f"still holds the test files, else {DEFAULT_DATA_DIR})")
    p.add_argument("--device", choices=cli.DEVICE_CHOICES, default="auto",
                   help="auto: CUDA if there is a GPU, else the CPU")
    p.add_argument("--fused", action="store_true", help="run the fused Triton model (any checkpoint loads into it)")
    p.add_argument("--batch-size", type=cli.positive_int, default=EVAL_BATCH_SIZE, metavar="N",
                   help="inference batch size")
    p.add_argument("--limit-test", type=cli.positive_int, metavar="N",
                   help=f"evaluate the first N test images only (default: all; {cli.INTERPRETER_TEST_IMAGES} for "
                        "--fused under Triton's interpreter)")
    p.add_argument("--max-images", type=cli.positive_int, default=64, metavar="N",
                   help="most misclassified images to draw")
    p.add_argument("--out", metavar="DIR", help="output directory (default: the checkpoint's directory)")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(evaluate, build_parser(), argv)


def evaluate(args: argparse.Namespace) -> int:
    import torch

    from fastlenet import data, engine, plots

    path = Path(args.checkpoint)
    device = cli.choose_device(args.device)
    checkpoint = load_checkpoint(path)
    dataset_name = args.dataset or checkpoint["config"].get("dataset", "mnist")
    if args.fused:
        cli.check_fused(device, args)
    out = cli.prepare_out_dir(Path(args.out) if args.out else path.parent)

    model = checkpoint_model(checkpoint, path, args.fused, device)
    variant = model.variant
    print(f"checkpoint {path}: {variant}, epoch {checkpoint['epoch']} | device {device} "
          f"({cli.device_name(device)}) | {'fused Triton' if args.fused else 'reference torch.nn'} model")
    dataset = data.load(dataset_name, args.data_dir or _run_data_dir(checkpoint, dataset_name), splits=("test",))
    test = dataset.test.first(args.limit_test)
    mean, std = engine.input_normalization(variant, dataset_name)
    x, y = data.to_device(test, device, mean, std)

    logits = engine.predict(model, x, args.batch_size)
    loss = engine.score(logits, y, engine.loss_function(args.fused, variant)).loss
    predicted = logits.argmax(1).cpu()
    truth = test.labels
    names = data.CLASS_NAMES[dataset_name]
    k = len(names)
    confusion = torch.bincount(truth * k + predicted, minlength=k * k).view(k, k)  # rows: true class
    per_class = {names[c]: (confusion[c, c] / confusion[c].sum()).item() if confusion[c].sum() else None
                 for c in range(k)}
    correct = int(confusion.diag().sum())
    accuracy = correct / len(truth)

    print(f"test accuracy {accuracy:.2%} ({correct:,}/{len(truth):,}), loss {loss:.4f}")
    print("per-class accuracy:")
    for name, acc in per_class.items():
        print(f"  {name:>12}  {acc:7.2%}" if acc is not None else f"  {name:>12}  (no test images)")

    wrong = (predicted != truth).nonzero().flatten()
    write_json(out / "evaluation.json", {
        "checkpoint": str(path), "epoch": checkpoint["epoch"], "variant": variant, "dataset": dataset_name,
        "dataset_source": dataset.source, "device": str(device), "fused": args.fused,
        "test_images": len(truth), "test_accuracy": accuracy, "test_loss": loss,
        "per_class_accuracy": per_class, "confusion_matrix": confusion.tolist(),
        "misclassified": [{"index": int(i), "predicted": int(predicted[i]), "true": int(truth[i])} for i in wrong],
    })
    plots.plot_confusion(confusion, names, out / "confusion_matrix.png",
                         title=f"{variant} on {dataset_name}: {accuracy:.2%}")
    plots.plot_misclassified(test.images, truth, predicted, wrong[:args.max_images], names, out / "misclassified.png",
                             total=len(wrong))
    print(f"wrote evaluation.json, confusion_matrix.png, misclassified.png ({len(wrong)} misclassified) to {out}")
    return 0


def _run_data_dir(checkpoint: dict, dataset_name: str) -> str:
    """The data directory the checkpoint's run trained from, if it still holds the test files of
    `dataset_name`; else the default one, saying so. Checkpoints record it as an absolute path
    (`data_dir`) and as the flag was given (config's: a relative one is tried from here, which is
    all that checkpoints from before the absolute one can offer)."""
    recorded = [d for d in (checkpoint.get("data_dir"), checkpoint["config"].get("data_dir")) if isinstance(d, str)]
    for candidate in recorded:
        if _holds_test_files(Path(candidate), dataset_name):
            return candidate
    default = DEFAULT_DATA_DIR
    if recorded and not _same_dir(recorded[0], default):
        print(f"the run's data directory {cli.short_repr(recorded[0], 200)} no longer holds the {dataset_name} "
              f"test files; using {default}")
    return default


def _holds_test_files(data_dir: Path, dataset_name: str) -> bool:
    """Whether data_dir holds the test files of `dataset_name` (or their .gz) where data.load looks;
    data.load verifies them."""
    from fastlenet import data

    raw = data_dir / data._FOLDER[dataset_name] / "raw"
    try:
        return all((raw / f).is_file() or (raw / f"{f}.gz").is_file() for f in data.SPLITS["test"])
    except (OSError, ValueError):  # unreadable, or a path no file system takes (a NUL byte)
        return False


def _same_dir(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError, RuntimeError):
        return False


if __name__ == "__main__":
    sys.exit(main())
