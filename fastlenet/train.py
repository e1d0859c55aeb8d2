"""Train LeNet-5 on MNIST or Fashion-MNIST: python -m fastlenet.train [flags] (see --help, or README).

The whole dataset sits on the training device as one normalised tensor and batches are cut from a
random permutation there: no DataLoader, no per-sample Python. The loop never waits for the device
inside an epoch; running loss and accuracy stay on the device and reach the progress bar every
POSTFIX_EVERY steps. Each epoch writes metrics.json and checkpoint.pt atomically into --out, so
--resume picks up after the last finished epoch; curves.png is drawn at the end. An --out that holds
an earlier run is refused, unless --resume continues it there or --overwrite replaces it. With
--val-split, a seeded fraction of the training images is held out, evaluated after every epoch, and
the weights of the epoch that does best on it are kept as best.pt (the test set never takes part in
that choice).

PyTorch is imported inside the functions that use it, not at the top, so that --help and a bad flag
are answered at once instead of after the seconds that importing PyTorch takes.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import fastlenet
from fastlenet import _cli
from fastlenet._cli import CLIError

if TYPE_CHECKING:
    import torch

    from fastlenet import data

POSTFIX_EVERY = 50  # steps between progress-bar updates, each of which waits for the device
EVAL_BATCH_SIZE = 2000  # inference batch: large, there is no backward to keep memory for

# Settings that define a training run: --resume takes them from the checkpoint, and giving one of
# them with another value than the checkpoint's is an error rather than a silently different run.
RUN_SETTINGS = ("variant", "dataset", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                "schedule", "seed", "limit_train", "limit_test", "augment", "val_split")
# Run settings that checkpoints of earlier versions do not record, with the value their runs had.
LATER_SETTINGS = {"val_split": None}


DESCRIPTION = (
    f"Train a network (--model NAME) on MNIST or Fashion-MNIST: one of the LeNet-5 variants "
    f"{', '.join(_cli.LENET5_NAMES)}, or one of the PyTorch MNIST tutorials' CNNs "
    f"{', '.join(_cli.TUTORIAL_NAMES)}; with stock torch.nn layers, or fastlenet's fused Triton layers (--fused).")
EPILOG = """\
examples:
  python -m fastlenet.train --out runs/lenet5
  python -m fastlenet.train --model cnn --optimizer sgd --lr 0.1 --momentum 0 --schedule none --out runs/cnn
  python -m fastlenet.train --resume runs/lenet5/checkpoint.pt --epochs 12

next:
  python -m fastlenet.evaluate RUN/checkpoint.pt
  python -m fastlenet.predict RUN/checkpoint.pt IMAGE..."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlenet.train", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=_cli.HelpFormatter)
    model = p.add_argument_group("model")
    # A metavar, so that argparse does not list the six names in the usage and twice more here.
    model.add_argument("--model", "--variant", dest="variant", choices=_cli.MODEL_NAMES, default="lenet5",
                       metavar="NAME",
                       help="the network, one of those named above; with --fused, a tutorial network's layers "
                            "are fused by fastlenet.fuse")
    model.add_argument("--fused", action="store_true",
                       help="use the fused Triton layers and loss (CUDA; CPU only under TRITON_INTERPRET=1)")
    model.add_argument("--amp", choices=("off", "fp16", "bf16"), default="off",
                       help="automatic mixed precision: forward and loss under torch.autocast in float16 "
                            "(with a GradScaler) or bfloat16, float32 weights; on the CPU the reference model "
                            "takes both (bf16 is the CPU's fast one), the fused one under Triton's interpreter "
                            "fp16 only")
    model.add_argument("--compile", action="store_true",
                       help="torch.compile the reference model (not with --fused), to compare like with like")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=_cli.DATASET_NAMES, default="mnist", help="dataset to train and test on")
    d.add_argument("--data-dir", default=_cli.DEFAULT_DATA_DIR, metavar="DIR", help="where the dataset is kept (fetched there if missing)")
    d.add_argument("--limit-train", type=_cli.positive_int, metavar="N", help="train on the first N images only")
    d.add_argument("--limit-test", type=_cli.positive_int, metavar="N",
                   help=f"test on the first N images only (default: all; {_cli.INTERPRETER_TEST_IMAGES} for --fused "
                        "under Triton's interpreter)")
    d.add_argument("--augment", action="store_true", help="shift each training image by up to 2 pixels")
    d.add_argument("--val-split", type=float, metavar="F",
                   help="hold out round(F x N) of the N training images (0 < F < 1), chosen by a permutation "
                        "seeded with --seed (the same on --resume), to validate on after each epoch; the "
                        "epoch with the best validation accuracy (ties: the lower validation loss, then the "
                        "earlier epoch) is kept as best.pt")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=_cli.positive_int, default=8, metavar="N", help="total epochs (with --resume: up to this many)")
    t.add_argument("--batch-size", type=_cli.positive_int, default=128, metavar="N", help="training batch size")
    t.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="optimizer")
    t.add_argument("--lr", type=_cli.non_negative_float, default=3e-3,
                   help="learning rate (the peak rate with --schedule onecycle)")
    t.add_argument("--momentum", type=_cli.non_negative_float, default=0.9,
                   help="SGD momentum (onecycle cycles it, and Adam's beta1, between 0.85 and 0.95)")
    t.add_argument("--weight-decay", type=_cli.non_negative_float, default=0.0, metavar="WD",
                   help="L2 weight decay (added to the gradient, as torch.optim does)")
    t.add_argument("--schedule", choices=("onecycle", "cosine", "none"), default="onecycle",
                   help="learning-rate schedule, stepped every batch")
    t.add_argument("--seed", type=int, default=0,
                   help="seeds the initial weights, batch order and augmentation: the same seed on the same "
                        "device with the same --threads repeats a run")
    r = p.add_argument_group("run")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA if there is a GPU, else the CPU")
    r.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                   help="run each training step as one CUDA graph replay; auto: on for --fused on CUDA")
    r.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_const", const="off",
                   help="the same as --cuda-graph off")
    r.add_argument("--threads", type=_cli.positive_int, metavar="N",
                   help="CPU threads for torch (default: torch's choice, one per core)")
    r.add_argument("--out", metavar="DIR",
                   help="output directory (default: a fresh runs/<timestamp>/; with --resume, the checkpoint's)")
    r.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT (a checkpoint.pt)")
    r.add_argument("--overwrite", action="store_true",
                   help=f"replace the run that --out holds: remove its files ({', '.join(_cli.RUN_FILES)}) "
                        "before training; without it, an --out that holds a run is an error, unless it is "
                        "the --resume checkpoint's own directory")
    r.add_argument("--target-accuracy", type=_fraction, metavar="A",
                   help="exit with status 1 if the final test accuracy (a fraction, e.g. 0.99) is below A")
    r.add_argument("--no-plot", action="store_true", help="do not draw curves.png")
    return p


def _fraction(text: str) -> float:
    value = _cli.non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"is a fraction in [0, 1] (0.99 for 99%), got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    return _cli.run(train, build_parser(), argv)


def train(args: argparse.Namespace) -> int:
    import torch

    from fastlenet import data
    from fastlenet.models import num_parameters

    if args.compile and args.fused:
        raise CLIError("--compile compiles the reference model; the fused model is already Triton kernels: "
                       "drop --compile or --fused")
    device = _cli.choose_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = None
    if args.resume:
        checkpoint = _cli.load_checkpoint(Path(args.resume))
        _adopt_run_settings(args, checkpoint["config"])
    if args.val_split is not None and not 0 < args.val_split < 1:  # also rejects nan
        raise CLIError(f"--val-split {args.val_split}: must be a fraction between 0 and 1, both excluded "
                       "(0.1 holds out 10% of the training images)")
    if args.fused:
        if args.amp == "bf16" and device.type != "cuda":
            raise CLIError("--amp bf16 with --fused needs a CUDA GPU: Triton's interpreter computes bfloat16 "
                           "dot products wrongly; use --amp fp16 here, or drop --fused")
        _cli.check_fused(device, args)
    graph = use_cuda_graph(args.cuda_graph, args.fused, device)
    if graph and args.amp == "fp16":
        # GradScaler.step reads its inf/NaN check back to the host (or, with a fused optimizer, skips
        # the update on the device): not a step a CUDA graph is known to capture, so none is tried.
        print("cuda graph: off with --amp fp16 (GradScaler's step is not captured); training without it")
        graph = False
    if args.out is None:  # a resumed run goes on writing beside its checkpoint
        args.out = str(Path(args.resume).parent) if args.resume else str(_fresh_run_dir())
    earlier_run = _earlier_run(Path(args.out), args)
    out = _cli.prepare_out_dir(Path(args.out))
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")}

    print(f"fastlenet {fastlenet.__version__} | torch {torch.__version__} | device {device} "
          f"({_cli.device_name(device)}) | {'fused Triton' if args.fused else 'reference torch.nn'} model")
    print("config: " + " ".join(f"{k}={v}" for k, v in config.items()))
    dataset = data.load(args.dataset, args.data_dir)
    mean, std = data.NORMALIZATION[args.dataset]
    train_split, val_split = _hold_out(dataset.train.first(args.limit_train), args)
    x_train, y_train = data.to_device(train_split, device, mean, std)
    x_val, y_val = data.to_device(val_split, device, mean, std) if val_split else (None, None)
    x_test, y_test = data.to_device(dataset.test.first(args.limit_test), device, mean, std)

    torch.manual_seed(args.seed)
    model = build_model(args.variant, args.fused, device)
    if device.type == "cpu" and not args.fused:
        model, x_train, x_val, x_test = channels_last(model, x_train, x_val, x_test)
    optimizer = _optimizer(model, args, capturable=graph)
    generator = torch.Generator().manual_seed(args.seed)  # on the CPU: the same batch order on any device
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    history, done = [], 0
    best, best_weights = None, None  # with --val-split: the history record of the best epoch, its weights
    if checkpoint is not None:
        done, history = _restore(checkpoint, Path(args.resume), model, optimizer, generator, args,
                                 args.epochs * steps_per_epoch)
        if val_split and done:
            best, best_weights = _restore_best(checkpoint, Path(args.resume), model, history)
    scheduler = _scheduler(optimizer, args.schedule, args.epochs * steps_per_epoch, done * steps_per_epoch,
                           checkpoint.get("scheduler") if checkpoint else None, cycle_momentum=not graph)
    if graph:
        lr_as_tensors(optimizer, device)
    loss_fn = loss_function(args.fused)
    net = torch.compile(model) if args.compile else model  # the module itself keeps the state_dict's names
    from fastlenet.profiling import Amp

    steps = StepRunner(net, optimizer, loss_fn, x_train, y_train, args.batch_size, graph=graph,
                       amp=Amp.of(args.amp, device.type))
    if graph:
        print("cuda graph: each full training step is one graph replay (--no-cuda-graph to turn it off)"
              + ("; onecycle holds momentum fixed, which the captured optimizer reads as a number"
                 if args.schedule == "onecycle" else ""))
    held_out = f"validation {len(x_val):,} / " if val_split else ""
    print(f"model: {args.variant}, {num_parameters(model):,} parameters | train {len(x_train):,} / {held_out}"
          f"test {len(x_test):,} images | {steps_per_epoch} steps per epoch")
    if done >= args.epochs:
        print(f"checkpoint is at epoch {done}, which already reaches --epochs {args.epochs}: nothing to train")

    if earlier_run:  # --overwrite: only now, when nothing that can stop the run is left before training
        _remove_run(out, earlier_run)
    saved = []  # epochs whose checkpoint is on disk in `out`
    # Where the data was, as an absolute path (config's data_dir is the flag as given, relative to
    # wherever the run started): fastlenet.evaluate reads the test files from there.
    data_dir = os.path.abspath(args.data_dir)

    def save(epoch: int) -> None:
        metrics = {"config": config, "device": str(device), "device_name": _cli.device_name(device),
                   "fused": args.fused, "dataset_source": dataset.source, "torch": torch.__version__,
                   "epochs": history, "test_accuracy": history[-1]["test_accuracy"] if history else None,
                   "best": best}
        if best is not None:  # before checkpoint.pt, which must never name a best epoch best.pt lacks
            _cli.save_torch(out / "best.pt", {
                "model": best_weights, "config": config, "epoch": best["epoch"],
                "epochs": [h for h in history if h["epoch"] <= best["epoch"]], "data_dir": data_dir,
                "fastlenet": fastlenet.__version__})
        _cli.save_torch(out / "checkpoint.pt", {
            "model": model.state_dict(), "optimizer": _plain_numbers(optimizer.state_dict()),
            "scheduler": _plain_numbers(scheduler.state_dict()) if scheduler else None, "epoch": epoch, "config": config,
            "epochs": history, "generator": generator.get_state(), "data_dir": data_dir,
            "fastlenet": fastlenet.__version__,
            "best": {"epoch": best["epoch"], "model": best_weights} if best is not None else None})
        _cli.write_json(out / "metrics.json", metrics)
        saved.append(epoch)

    try:
        for epoch in range(done + 1, args.epochs + 1):
            train_loss, train_acc, seconds = train_epoch(
                steps, scheduler, x_train, y_train, generator=generator, augment=args.augment,
                desc=f"epoch {epoch}/{args.epochs}")
            record = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc}
            validated = ""
            if val_split:
                val_loss, val_acc = evaluate(net, loss_fn, x_val, y_val)
                record.update(val_loss=val_loss, val_accuracy=val_acc)
                validated = f"val loss {val_loss:.4f} acc {val_acc:7.2%}  "
            test_loss, test_acc = evaluate(net, loss_fn, x_test, y_test)
            record.update(test_loss=test_loss, test_accuracy=test_acc,
                          images_per_second=len(x_train) / seconds, seconds=seconds)
            history.append(record)
            if val_split and improves(record, best):
                best, best_weights = record, {k: v.detach().clone() for k, v in model.state_dict().items()}
            print(f"epoch {epoch:>3}/{args.epochs}  train loss {train_loss:.4f} acc {train_acc:7.2%}  {validated}"
                  f"test loss {test_loss:.4f} acc {test_acc:7.2%}  {len(x_train) / seconds:9,.0f} img/s  "
                  f"{seconds:6.1f} s", flush=True)
            save(epoch)
    except KeyboardInterrupt:
        if saved:
            print(f"\n{out / 'checkpoint.pt'} holds epoch {saved[-1]}: continue with "
                  f"--resume {out / 'checkpoint.pt'}", file=sys.stderr)
        raise
    if done >= args.epochs:
        save(done)
    if history and not args.no_plot:
        plot_curves(history, out / "curves.png", title=f"{args.variant} on {args.dataset}",
                    best_epoch=best["epoch"] if best is not None else None)

    final = history[-1]["test_accuracy"] if history else None
    summary = [f"final test accuracy {final:.2%}" if final is not None else "no epochs trained"]
    if best is not None:
        summary.append(f"best.pt: epoch {best['epoch']}, validation accuracy {best['val_accuracy']:.2%} "
                       f"(test accuracy {best['test_accuracy']:.2%})")
    print(*summary, f"outputs in {out}", sep=" | ")
    if args.target_accuracy is not None and (final is None or final < args.target_accuracy):
        print(f"test accuracy below the target {args.target_accuracy:.2%}", file=sys.stderr)
        return 1
    return 0


def _fresh_run_dir() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path("runs") / stamp, 1
    while path.exists():
        path, n = Path("runs") / f"{stamp}-{n}", n + 1
    return path


def _earlier_run(out: Path, args: argparse.Namespace) -> list[str]:
    """The files of an earlier run in `out` that --overwrite is to remove (none without it).

    Training into a directory that holds a run would replace its checkpoint and leave its other files
    (an evaluation of the old weights) beside the new ones; so that is an error, except for --resume
    into the checkpoint's own directory, which continues that run.
    """
    try:
        found = [name for name in _cli.RUN_FILES if (out / name).is_file()]
    except OSError:  # not a directory one can look into: prepare_out_dir says why
        return []
    continuing = args.resume is not None and out.resolve() == Path(args.resume).resolve().parent
    if continuing:
        if args.overwrite:
            raise CLIError(f"--overwrite with --resume {args.resume}: --out {out} is the checkpoint's own "
                           "directory, whose run this continues; drop --overwrite, or choose another --out")
        return []
    if not found or args.overwrite:
        return found
    resume = (f"continue it with --resume {out / 'checkpoint.pt'}, "
              if "checkpoint.pt" in found and args.resume is None else "")
    raise CLIError(f"--out {out} already holds a run ({', '.join(found)}): {resume}replace it with --overwrite, "
                   "or choose another --out")


def _remove_run(out: Path, names: list[str]) -> None:
    """Remove the run files `names` from `out`, and the temporary files an interrupted write of one
    of them may have left (see data.atomic_write_bytes); nothing else."""
    paths = [out / name for name in names]
    paths += [p for name in _cli.RUN_FILES for p in out.glob(f".{name}.*.tmp")]
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise CLIError(f"--overwrite: cannot remove {path} ({e.strerror or e})") from None
    print(f"--overwrite: removed the earlier run's {', '.join(names)} from {out}")


def _adopt_run_settings(args: argparse.Namespace, saved: dict) -> None:
    """--resume continues the saved run: its settings apply unless a flag given now disagrees."""
    actions = {action.dest: action for action in build_parser()._actions}
    saved = {**LATER_SETTINGS, **saved}
    for key in RUN_SETTINGS:
        if key not in saved:
            continue
        flag = "--" + key.replace("_", "-")
        if not _valid_setting(actions[key], saved[key]):
            raise _cli.unreadable(Path(args.resume), f"its {key} {_cli.short_repr(saved[key])} is not a value of {flag}")
        if key in args._given and getattr(args, key) != saved[key]:
            raise CLIError(f"--resume {args.resume}: the checkpoint was trained with {flag} {saved[key]}, "
                           f"not {getattr(args, key)}; drop {flag} to continue it, or start a new run")
        setattr(args, key, saved[key])


def _valid_setting(action: argparse.Action, value) -> bool:
    """Whether `value`, read from a checkpoint, is one the flag of `action` could have produced."""
    if action.nargs == 0:  # store_true
        return type(value) is bool
    if value is None:
        return action.default is None
    try:
        parsed = action.type(str(value)) if action.type else str(value)
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return False
    return type(parsed) is type(value) and parsed == value and (action.choices is None or value in action.choices)


def _hold_out(split: data.Split, args: argparse.Namespace) -> tuple[data.Split, data.Split | None]:
    """(the images to train on, the --val-split images to validate on, or None without --val-split)."""
    from fastlenet import data

    if args.val_split is None:
        return split, None
    n = len(split)
    n_val = round(args.val_split * n)
    if 0 < n_val < n:
        return data.hold_out(split, n_val, args.seed)
    images = f"the {n:,} training images" + (f" (--limit-train {args.limit_train})" if args.limit_train else "")
    if n_val == 0:
        raise CLIError(f"--val-split {args.val_split} holds out no image of {images} (round(F x N) = 0): "
                       "use a larger fraction or more training images")
    raise CLIError(f"--val-split {args.val_split} holds out all {images}, leaving none to train on: "
                   "use a smaller fraction or more training images")


def improves(record: dict, best: dict | None) -> bool:
    """Whether the epoch `record` is better than the best so far (None: none yet), judged on the
    validation split alone: a higher accuracy; at equal accuracy a lower loss; at equal both, the
    earlier epoch stays. The test split never takes part."""
    return best is None or (record["val_accuracy"], -record["val_loss"]) > (best["val_accuracy"], -best["val_loss"])


def _restore_best(checkpoint: dict, path: Path, model, history: list) -> tuple[dict, dict]:
    """The best epoch so far of a --val-split run (its history record) and its weights, from the
    checkpoint, checked: they are saved to best.pt as they are."""
    import copy

    best = checkpoint.get("best")
    if not isinstance(best, dict) or type(best.get("epoch")) is not int or not _cli.is_state_dict(best.get("model")):
        raise _cli.unreadable(path, "its best entry is not the best epoch and its weights, which a --val-split run keeps")
    record = next((h for h in history if h["epoch"] == best["epoch"]), None)
    if record is None or not all(type(record.get(k)) in (int, float) for k in ("val_loss", "val_accuracy")):
        raise _cli.unreadable(path, f"its best epoch {_cli.short_repr(best['epoch'])} has no validation "
                                    "loss and accuracy in its epochs entry")
    _cli.load_weights(copy.deepcopy(model), best["model"], path)  # names and shapes, on a throwaway copy
    return record, best["model"]


def build_model(name: str, fused: bool, device: torch.device) -> torch.nn.Module:
    from fastlenet import models

    return models.build_model(name, fused=fused).to(device)


def channels_last(model: torch.nn.Module, *images: torch.Tensor | None):
    """The model and image tensors in NHWC layout, which PyTorch's CPU kernels handle faster for
    LeNet's few channels (oneDNN's conv1 weight gradient and max-pooling most of all): about 10-15%
    per training step and 40% at inference on a 2-core EPYC. Values and state_dict are unchanged;
    an image tensor that is None (no validation split) stays None."""
    import torch

    layout = torch.channels_last
    return (model.to(memory_format=layout), *(x if x is None else x.contiguous(memory_format=layout) for x in images))


def loss_function(fused: bool):
    if fused:
        from fastlenet.functional import cross_entropy  # imports Triton: only when asked for
        return cross_entropy
    from torch.nn.functional import cross_entropy

    return cross_entropy


def use_cuda_graph(choice: str, fused: bool, device: torch.device) -> bool:
    """--cuda-graph: auto is on for the fused model on CUDA, where launching a dozen small kernels
    one by one from Python costs more than the arithmetic; on asks for it on any model."""
    if choice == "on" and device.type != "cuda":
        raise CLIError(f"--cuda-graph on: CUDA graphs need a CUDA device, and this run is on {device.type}; "
                       "use --cuda-graph auto or off")
    return choice == "on" or (choice == "auto" and fused and device.type == "cuda")


def _optimizer(model: torch.nn.Module, args: argparse.Namespace, capturable: bool = False) -> torch.optim.Optimizer:
    # fused=True: one kernel for the whole update, on the GPU and (torch >= 2.4) on the CPU, where it
    # makes a batch-64 LeNet-5 step about 10% faster than the default per-parameter loop.
    # capturable=True (for a CUDA graph) keeps Adam's step counters on the device; torch allows it with
    # fused=True. Fused SGD keeps no counter and has no such setting.
    import torch

    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True,
                                capturable=capturable)
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay, fused=True)


def _scheduler(optimizer, schedule: str, total_steps: int, done_steps: int, saved_state: dict | None,
               cycle_momentum: bool = True):
    """The per-batch learning-rate schedule, positioned after `done_steps` steps.

    Both schedules are closed-form functions of the step, so a resumed run with more --epochs than
    before stretches the schedule over the new total instead of failing past its end.
    cycle_momentum=False keeps onecycle off the momentum (Adam's beta1): torch's fused optimizers
    take it as a Python number, which a CUDA graph fixes at capture.
    """
    import torch

    if schedule == "none":
        return None
    last = done_steps - 1  # constructors step once: -1 starts at step 0
    if schedule == "onecycle":
        momentum_group = optimizer.param_groups[0]
        cycle = cycle_momentum and ("betas" in momentum_group or momentum_group.get("momentum", 0) > 0)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g.get("max_lr", g["lr"]) for g in optimizer.param_groups],
            # OneCycleLR divides by its warm-up length, 0.25 * total - 1 steps: under 5 steps in all
            # it would divide by zero, so a run that short gets the first steps of a 5-step cycle.
            total_steps=max(total_steps, done_steps + 1, 5), pct_start=0.25, cycle_momentum=cycle,
            last_epoch=last)
        same_length = saved_state is not None and saved_state.get("total_steps") == total_steps \
            and saved_state.get("cycle_momentum") == cycle
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)),
            last_epoch=last)
        same_length = False
    if same_length:
        scheduler.load_state_dict(saved_state)
    return scheduler


def _restore(checkpoint: dict, path: Path, model, optimizer, generator, args: argparse.Namespace,
             total_steps: int) -> tuple[int, list]:
    """Weights, optimizer state and batch order from the checkpoint: (epochs done, their history)."""
    _cli.load_weights(model, checkpoint["model"], path)
    _check_resumable(checkpoint, path, model, args, total_steps)
    state = checkpoint["optimizer"]
    # The kernel choice is this run's (a CUDA checkpoint may resume on the CPU and back); setting it
    # before loading also puts Adam's step counters where that kernel wants them.
    for group in state["param_groups"]:
        group.update(fused=optimizer.defaults.get("fused"), foreach=optimizer.defaults.get("foreach"))
        if "capturable" in optimizer.defaults:
            group["capturable"] = optimizer.defaults["capturable"]
    optimizer.load_state_dict(state)
    generator.set_state(checkpoint["generator"])
    return checkpoint["epoch"], list(checkpoint.get("epochs", []))


def _check_resumable(checkpoint: dict, path: Path, model, args: argparse.Namespace, total_steps: int) -> None:
    """The optimizer, schedule and batch-order states of `checkpoint` have the types and shapes of a
    fresh run's after one step, so that no step fails later on a value read from the file (which
    load_state_dict takes on trust)."""
    import copy

    import torch

    probe = copy.deepcopy(model)  # a throwaway copy: the probing step must not touch the weights
    fresh_optimizer = _optimizer(probe, args)
    plain_keys = set(fresh_optimizer.param_groups[0])
    fresh_scheduler = _scheduler(fresh_optimizer, args.schedule, total_steps, 0, None)  # adds its keys
    for parameter in probe.parameters():
        parameter.grad = torch.zeros_like(parameter)
    fresh_optimizer.step()  # creates the per-parameter state (Adam's moments, SGD's momentum)
    if "optimizer" not in checkpoint:
        why = "it has no optimizer entry, only weights (as a best.pt): resume from the run's checkpoint.pt"
    else:
        why = _optimizer_state_problem(checkpoint["optimizer"], fresh_optimizer.state_dict(), plain_keys)
    saved_schedule = checkpoint.get("scheduler")
    if why is None and fresh_scheduler is not None:
        fresh = fresh_scheduler.state_dict()
        if saved_schedule is None:
            why = "it has no scheduler state for its schedule"
        elif not isinstance(saved_schedule, dict) or any(
                key in saved_schedule and _kind(saved_schedule[key]) != _kind(fresh[key]) for key in fresh):
            why = "its scheduler state is not the one of its schedule"
    generator_state = checkpoint.get("generator")
    if why is None and not (isinstance(generator_state, torch.Tensor) and generator_state.dtype == torch.uint8
                            and generator_state.shape == torch.Generator().get_state().shape):
        why = "its generator entry is not the state of a torch.Generator"
    if why is not None:
        raise _cli.unreadable(path, why)


def _optimizer_state_problem(saved, fresh: dict, plain_keys: set) -> str | None:
    """What keeps the saved optimizer state from having the kinds of `fresh` (a state_dict), or None."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list) or len(saved["param_groups"]) != len(fresh["param_groups"]):
        return "its optimizer entry is not the state of the run's optimizer"
    for saved_group, group in zip(saved["param_groups"], fresh["param_groups"]):
        if not isinstance(saved_group, dict) or _kind(saved_group.get("params")) != _kind(group["params"]):
            return "its optimizer entry does not hold the model's parameters"
        for key, value in group.items():
            if key in ("params", "fused", "foreach", "capturable"):  # the parameters are checked above; the kernel is this run's
                continue
            if (isinstance(value, bool) or value is None) and key in plain_keys:
                same = saved_group.get(key, value) == value  # a flag: torch fills in a missing one
            else:  # a number, or a key the schedule needs (e.g. initial_lr)
                same = key in saved_group and _kind(saved_group[key]) == _kind(value)
            if not same:
                return f"its optimizer setting {key} is {_cli.short_repr(saved_group.get(key))}, which this run cannot take"
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(set(ids)) != len(ids):
        return "its optimizer entry does not hold the model's parameters"
    fresh_entries = dict(zip(ids, (fresh["state"][i] for group in fresh["param_groups"] for i in group["params"])))
    for key, entry in saved["state"].items():
        if key not in fresh_entries or _kind(entry) != _kind(fresh_entries[key]):
            return "its optimizer state does not match the model's parameters"
    return None


def _kind(value) -> object:
    """A value's type, with the kinds of a container's elements and a tensor's shape: what a state read
    from a checkpoint must share with a fresh run's, whatever the values."""
    import torch

    if isinstance(value, torch.Tensor):
        return "tensor", value.is_floating_point(), tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_kind(v) for v in value)
    if isinstance(value, dict):
        return "dict", tuple(sorted((repr(k), _kind(v)) for k, v in value.items()))
    return "number" if type(value) in (int, float) else type(value).__name__


def lr_as_tensors(optimizer, device: torch.device) -> None:
    """Each group's learning rate as a 1-element tensor on `device`: what a captured optimizer step
    reads at every replay, and what the schedulers update in place (fill_) between replays."""
    import torch

    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def _plain_numbers(state: dict) -> dict:
    """A state_dict with its 1-element tensor learning rates (see lr_as_tensors) as plain numbers, so
    that a checkpoint is the same with and without a CUDA graph (the optimizer's per-parameter
    state is left as it is)."""
    import torch

    def plain(value):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
            return value.item()
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    out = {k: plain(v) for k, v in state.items() if k != "param_groups"}
    if "param_groups" in state:
        out["param_groups"] = [{k: plain(v) for k, v in group.items()} for group in state["param_groups"]]
    if "state" in state:
        out["state"] = state["state"]
    return out


class StepRunner:
    """Runs profiling.training_step on batches copied into static buffers (one batch long), the
    running loss and accuracy accumulating in static device tensors, so that with graph=True the
    step can be captured in a CUDA graph at the first full batch and replayed for the others (the
    batches are copied into the buffers only then; without a graph each step runs on its batch).

    A batch shorter than the buffers (an epoch's last, when batch_size does not divide the data)
    runs eagerly: the same step function, uncaptured, on the batch itself. If the capture fails,
    one line says why and every step runs eagerly: the graph is an optimisation, never a reason to
    fail.
    """

    def __init__(self, model, optimizer, loss_fn, x, y, batch_size: int, *, graph: bool = False, amp=None):
        import torch

        self.model, self.optimizer, self.loss_fn, self.graph, self.amp = model, optimizer, loss_fn, graph, amp
        n = min(batch_size, len(x))
        self.x = torch.empty_like(x[:n])  # keeps the data's layout (channels-last on the CPU)
        self.y = torch.empty_like(y[:n])
        self.loss_sum = torch.zeros((), device=x.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=x.device)
        self.replay = None

    def reset(self) -> None:
        """Zero the running sums, in place: a captured graph holds their addresses."""
        self.loss_sum.zero_()
        self.correct.zero_()

    def _step(self, x=None, y=None) -> None:
        from fastlenet.profiling import training_step

        training_step(self.model, self.optimizer, self.loss_fn, self.x if x is None else x,
                      self.y if y is None else y, self.loss_sum, self.correct, amp=self.amp)

    def __call__(self, xb, yb) -> None:
        if (self.replay is None and not self.graph) or len(xb) != len(self.x):
            # No graph, or the last partial batch, which runs eagerly (see the class docstring).
            self._step(xb, yb)
            return
        self.x.copy_(xb)
        self.y.copy_(yb)
        if self.replay is not None:
            self.replay()
            return
        self.graph = False  # one try
        from fastlenet import profiling

        try:
            # The warm-up call is this batch's real step; the capture records without running.
            self.replay = profiling.capture(self._step, warmup=1)
        except Exception as e:  # noqa: BLE001 -- any failure: train on without the graph
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            print(f"cuda graph: capture failed ({reason}); training without it", file=sys.stderr)


def train_epoch(steps: StepRunner, scheduler, x, y, *, generator, augment: bool = False,
                desc: str = "") -> tuple[float, float, float]:
    """One pass over (x, y) through `steps`: mean loss, accuracy and seconds. Waits for the device
    only for the bar."""
    from tqdm import tqdm

    from fastlenet import data

    steps.model.train()
    steps.reset()
    seen = 0
    batch_size = len(steps.x)
    start = time.perf_counter()
    # disable=None: no bar when stderr is not a terminal (logs and CI stay clean)
    with tqdm(total=math.ceil(len(x) / batch_size), desc=desc, unit="batch", leave=False, disable=None,
              dynamic_ncols=True) as bar:
        for step, (xb, yb) in enumerate(data.batches(x, y, batch_size, generator=generator, augment=augment), 1):
            steps(xb, yb)
            if scheduler is not None:
                scheduler.step()  # outside the graph: it updates the learning-rate tensors in place
            seen += len(yb)
            if not bar.disable:
                bar.update()
                if step % POSTFIX_EVERY == 0:
                    bar.set_postfix(loss=f"{steps.loss_sum.item() / seen:.4f}",
                                    acc=f"{steps.correct.item() / seen:.2%}", refresh=False)
    # .item() waits for the device
    train_loss, train_acc = steps.loss_sum.item() / seen, steps.correct.item() / seen
    return train_loss, train_acc, time.perf_counter() - start


def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """Logits for all of x, in large batches, with no autograd bookkeeping."""
    import torch

    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def evaluate(model, loss_fn, x, y, batch_size: int = EVAL_BATCH_SIZE) -> tuple[float, float]:
    """(mean loss, accuracy) of model on (x, y)."""
    import torch

    logits = predict(model, x, batch_size)
    with torch.inference_mode():
        loss = loss_fn(logits, y)
        correct = (logits.argmax(1) == y).sum()
    return loss.item(), correct.item() / len(y)


TRAIN_LABEL = "train (running mean over the epoch)"  # measured while the weights changed, not after


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
    fig = _cli.new_figure(figsize=(10, 4), layout="constrained")
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
    _cli.save_figure(path, fig)


if __name__ == "__main__":
    sys.exit(main())
