"""Train LeNet-5 on MNIST or Fashion-MNIST: python -m fastlenet.train [flags] (see --help, or README).

The parser and the orchestration of a run. The data sits on the device as one tensor (fastlenet.data);
fastlenet.engine runs the steps, epochs and evaluations; after each epoch fastlenet.checkpoint writes
metrics.json and checkpoint.pt into --out, so --resume picks up after the last finished epoch. An --out
that holds an earlier run is refused, unless --resume continues it there or --overwrite replaces it.
With --val-split, a seeded fraction of the training images is held out and validated on after every
epoch; the weights of the epoch that does best on it are kept as best.pt (the test set takes no part).
Under torchrun (torchrun --nproc-per-node N -m fastlenet.train ...) the N processes train one model
with DistributedDataParallel, --batch-size the global batch (fastlenet.distributed); rank 0 alone
prints and writes. PyTorch is imported inside train(), so that --help and a bad flag are answered at once.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import fastlenet
from fastlenet import checkpoint, cli, names
from fastlenet.cli import CLIError

if TYPE_CHECKING:
    from fastlenet import data

DESCRIPTION = (
    f"Train a network (--model NAME) on MNIST or Fashion-MNIST: one of the LeNet-5 variants "
    f"{', '.join(names.LENET5_NAMES)}, LeNet-5 as published in 1998 {', '.join(names.PAPER_NAMES)} "
    f"(scaled tanh, sparse C3, RBF output, MAP loss), or one of the PyTorch MNIST tutorials' CNNs "
    f"{', '.join(names.TUTORIAL_NAMES)}; with stock torch.nn layers, or fastlenet's fused Triton layers (--fused).")
EPILOG = """\
examples:
  python -m fastlenet.train --out runs/lenet5
  python -m fastlenet.train --model cnn --optimizer sgd --lr 0.1 --momentum 0 --schedule none --out runs/cnn
  python -m fastlenet.train --resume runs/lenet5/checkpoint.pt --epochs 12
  torchrun --nproc-per-node 2 -m fastlenet.train --out runs/lenet5-ddp

next:
  python -m fastlenet.evaluate RUN/checkpoint.pt
  python -m fastlenet.predict RUN/checkpoint.pt IMAGE..."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlenet.train", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=cli.HelpFormatter)
    model = p.add_argument_group("model")
    # A metavar, so that argparse does not list the six names in the usage and twice more here.
    model.add_argument("--model", "--variant", dest="variant", choices=names.MODEL_NAMES, default="lenet5",
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
    d.add_argument("--dataset", choices=names.DATASET_NAMES, default="mnist", help="dataset to train and test on")
    d.add_argument("--data-dir", default=names.DEFAULT_DATA_DIR, metavar="DIR",
                   help="where the dataset is kept (fetched there if missing)")
    d.add_argument("--limit-train", type=cli.positive_int, metavar="N", help="train on the first N images only")
    d.add_argument("--limit-test", type=cli.positive_int, metavar="N",
                   help=f"test on the first N images only (default: all; {cli.INTERPRETER_TEST_IMAGES} for --fused "
                        "under Triton's interpreter)")
    d.add_argument("--augment", action="store_true", help="shift each training image by up to 2 pixels")
    d.add_argument("--val-split", type=float, metavar="F",
                   help="hold out round(F x N) of the N training images (0 < F < 1), chosen by a permutation "
                        "seeded with --seed (the same on --resume), to validate on after each epoch; the "
                        "epoch with the best validation accuracy (ties: the lower validation loss, then the "
                        "earlier epoch) is kept as best.pt")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=cli.positive_int, default=8, metavar="N", help="total epochs (--resume: up to N)")
    t.add_argument("--batch-size", type=cli.positive_int, default=128, metavar="N", help="training batch size")
    t.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="optimizer")
    t.add_argument("--lr", type=cli.non_negative_float, default=3e-3,
                   help="learning rate (the peak rate with --schedule onecycle)")
    t.add_argument("--momentum", type=cli.non_negative_float, default=0.9,
                   help="SGD momentum (onecycle cycles it, and Adam's beta1, between 0.85 and 0.95)")
    t.add_argument("--weight-decay", type=cli.non_negative_float, default=0.0, metavar="WD",
                   help="L2 weight decay (added to the gradient, as torch.optim does)")
    t.add_argument("--schedule", choices=("onecycle", "cosine", "none"), default="onecycle",
                   help="learning-rate schedule, stepped every batch")
    t.add_argument("--seed", type=int, default=0,
                   help="seeds the initial weights, batch order and augmentation: the same seed on the same "
                        "device with the same --threads repeats a run")
    r = p.add_argument_group("run")
    r.add_argument("--device", choices=cli.DEVICE_CHOICES, default="auto",
                   help="auto: CUDA if there is a GPU, else the CPU")
    r.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                   help="run each training step as one CUDA graph replay; auto: on for --fused on CUDA")
    r.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_const", const="off", help="--cuda-graph off")
    r.add_argument("--threads", type=cli.positive_int, metavar="N",
                   help="CPU threads for torch (default: torch's choice, one per core)")
    r.add_argument("--out", metavar="DIR",
                   help="output directory (default: a fresh runs/<timestamp>/; with --resume, the checkpoint's)")
    r.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT (a checkpoint.pt)")
    r.add_argument("--overwrite", action="store_true",
                   help=f"replace the run that --out holds: remove its files ({', '.join(checkpoint.RUN_FILES)}) "
                        "before training; without it, an --out that holds a run is an error, unless it is "
                        "the --resume checkpoint's own directory")
    r.add_argument("--dist-timeout", type=cli.positive_int, default=300, metavar="S",
                   help="under torchrun: seconds a process waits for the others at a gradient or metric "
                        "exchange before the run stops (a process that died or hung)")
    r.add_argument("--target-accuracy", type=cli.fraction, metavar="A",
                   help="exit with status 1 if the final test accuracy (a fraction, e.g. 0.99) is below A")
    r.add_argument("--no-plot", action="store_true", help="do not draw curves.png")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(train, build_parser(), argv)


def train(args: argparse.Namespace) -> int:
    from fastlenet import distributed

    try:
        ranks = distributed.Ranks.from_environment()
    except ValueError as e:
        raise CLIError(f"torchrun's environment: {e}") from None
    if not ranks.main:
        # One voice: the other ranks print nothing, and show no progress bar; errors still reach stderr.
        os.environ["TQDM_DISABLE"] = "1"
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    if ranks.enabled:
        distributed.stop_on_sigterm()
    try:
        return _train(args, ranks)
    except Exception as e:  # noqa: BLE001 - only a lost peer is answered here; the rest is re-raised
        if not isinstance(e, distributed.Stopped) and not distributed.lost(e):
            raise
        distributed.ignore_sigterm()
        # One line, not a traceback per rank: a peer died (torchrun stops the rest) or hung (the
        # timeout). The last finished epoch's checkpoint was written atomically: it is intact.
        where = Path(args.out) / "checkpoint.pt" if args.out else None
        kept = f"; {where} holds the last finished epoch" if where is not None and where.exists() else ""
        why = str(e) if isinstance(e, distributed.Stopped) else (
            "another process of the run died or stopped answering ("
            + re.sub(r"^\[[^\]]*\]\s*", "", cli.one_line(e))[:120] + ")")
        print(f"error: rank {ranks.rank}: {why}{kept}", file=sys.stderr)
        return 1
    finally:
        if ranks.enabled:
            distributed.ignore_sigterm()
        distributed.stop()


def _train(args: argparse.Namespace, ranks) -> int:
    import torch

    from fastlenet import data, distributed, engine, models, plots

    if args.compile and args.fused:
        raise CLIError("--compile compiles the reference model; the fused model is already Triton kernels: "
                       "drop --compile or --fused")
    device = cli.choose_device(args.device)
    try:
        device = distributed.device_of(ranks, device)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    resumed = checkpoint.load_to_resume(args, build_parser())  # None without --resume
    if args.val_split is not None and not 0 < args.val_split < 1:  # also rejects nan
        raise CLIError(f"--val-split {args.val_split}: must be a fraction between 0 and 1, both excluded "
                       "(0.1 holds out 10% of the training images)")
    if args.fused:
        cli.check_fused(device, args)
    try:
        graph = engine.use_cuda_graph(args.cuda_graph, args.fused, device)
    except ValueError as e:
        raise CLIError(f"--cuda-graph {args.cuda_graph}: {e}; use --cuda-graph auto or off") from None
    if graph and ranks.enabled:
        # PyTorch's recipe for capturing DDP's all-reduce turns NCCL's asynchronous error handling off,
        # which is what ends a run whose peer died or hung within --dist-timeout; a bounded failure is
        # kept over the graph. (DDP also rebuilds its buckets over its first steps: a capture at the
        # first batch would freeze them.)
        print("cuda graph: off under torch.distributed: capturing NCCL's all-reduce needs its error "
              "handling off, and a dead process would then hang the run past --dist-timeout")
        graph = False
    if graph and args.amp == "fp16":
        # GradScaler.step reads its inf/NaN check back to the host (or, with a fused optimizer, skips
        # the update on the device): not a step a CUDA graph is known to capture, so none is tried.
        print("cuda graph: off with --amp fp16 (GradScaler's step is not captured); training without it")
        graph = False
    if args.out is None:  # a resumed run goes on writing beside its checkpoint
        args.out = str(Path(args.resume).parent) if args.resume else str(checkpoint.fresh_run_dir())
    earlier_run = checkpoint.earlier_run(Path(args.out), args.resume, args.overwrite)
    # Rank 0 alone writes: the others only read (the checks above, the data, a --resume checkpoint).
    out = cli.prepare_out_dir(Path(args.out)) if ranks.main else Path(args.out)
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    backend = distributed.start(ranks, device, args.dist_timeout)

    processes = f" | {ranks.world} processes ({backend}), --batch-size global" if ranks.enabled else ""
    print(f"fastlenet {fastlenet.__version__} | torch {torch.__version__} | device {device} "
          f"({cli.device_name(device)}) | {'fused Triton' if args.fused else 'reference torch.nn'} model"
          + processes)
    print("config: " + " ".join(f"{k}={v}" for k, v in config.items()))
    dataset = data.load(args.dataset, args.data_dir)
    mean, std = engine.input_normalization(args.variant, args.dataset)
    train_split, val_split = _hold_out(dataset.train.first(args.limit_train), args)
    x_train, y_train = data.to_device(train_split, device, mean, std)
    x_val, y_val = data.to_device(val_split, device, mean, std) if val_split else (None, None)
    x_test, y_test = data.to_device(dataset.test.first(args.limit_test), device, mean, std)

    torch.manual_seed(args.seed)
    model = models.build_model(args.variant, fused=args.fused).to(device)
    if device.type == "cpu" and not args.fused:
        model, x_train, x_val, x_test = engine.channels_last(model, x_train, x_val, x_test)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    info = {"device": str(device), "device_name": cli.device_name(device), "fused": args.fused,
            "processes": ranks.world, "dataset_source": dataset.source, "torch": torch.__version__}
    generator = torch.Generator().manual_seed(args.seed)  # on the CPU: the same batch order on any device
    run = checkpoint.Run(out, config, info, os.path.abspath(args.data_dir), model,
                         engine.build_optimizer(model, args, capturable=graph), generator)
    if resumed is not None:
        run.resume(resumed, Path(args.resume), args, total_steps, keep_best=bool(val_split))
    run.scheduler = engine.build_scheduler(run.optimizer, args.schedule, total_steps, run.done * steps_per_epoch,
                                           resumed.get("scheduler") if resumed else None, cycle_momentum=not graph)
    if graph:
        engine.lr_as_tensors(run.optimizer, device)
    loss_fn = engine.loss_function(args.fused, args.variant)
    trained, model, note = distributed.wrap(model, ranks, device)  # model: unwrapped, as saved
    if note:
        print(note)
    net = torch.compile(trained) if args.compile else trained  # the module itself keeps the state_dict's names
    # Evaluation: every rank its share of the images, through the unwrapped model (engine.evaluate).
    judge = model if ranks.enabled else net
    steps = engine.StepRunner(net, run.optimizer, loss_fn, x_train, y_train, args.batch_size, graph=graph,
                              amp=engine.Amp.of(args.amp, device.type), ranks=ranks)
    if graph:
        print("cuda graph: each full training step is one graph replay (--no-cuda-graph to turn it off)"
              + ("; onecycle holds momentum fixed, which the captured optimizer reads as a number"
                 if args.schedule == "onecycle" else ""))
    held_out = f"validation {len(x_val):,} / " if val_split else ""
    print(f"model: {args.variant}, {models.num_parameters(model):,} parameters | train {len(x_train):,} / {held_out}"
          f"test {len(x_test):,} images | {steps_per_epoch} steps per epoch")
    if run.done >= args.epochs:
        print(f"checkpoint is at epoch {run.done}, which already reaches --epochs {args.epochs}: nothing to train")

    if earlier_run and ranks.main:  # --overwrite: only now, when nothing that can stop the run is left
        checkpoint.remove_run(out, earlier_run)
    try:
        for epoch in range(run.done + 1, args.epochs + 1):
            train_loss, train_acc, seconds = engine.train_epoch(
                steps, run.scheduler, x_train, y_train, generator=run.generator, augment=args.augment,
                desc=f"epoch {epoch}/{args.epochs}")
            record = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc}
            validated = ""
            if val_split:
                val_loss, val_acc = engine.evaluate(judge, loss_fn, x_val, y_val, ranks=ranks)
                record.update(val_loss=val_loss, val_accuracy=val_acc)
                validated = f"val loss {val_loss:.4f} acc {val_acc:7.2%}  "
            test_loss, test_acc = engine.evaluate(judge, loss_fn, x_test, y_test, ranks=ranks)
            record.update(test_loss=test_loss, test_accuracy=test_acc,
                          images_per_second=len(x_train) / seconds, seconds=seconds)
            run.add(record, best_of=bool(val_split))
            print(f"epoch {epoch:>3}/{args.epochs}  train loss {train_loss:.4f} acc {train_acc:7.2%}  {validated}"
                  f"test loss {test_loss:.4f} acc {test_acc:7.2%}  {len(x_train) / seconds:9,.0f} img/s  "
                  f"{seconds:6.1f} s", flush=True)
            if ranks.main:
                run.save(epoch)
    except KeyboardInterrupt:
        if run.saved:
            print(f"\n{out / 'checkpoint.pt'} holds epoch {run.saved[-1]}: continue with "
                  f"--resume {out / 'checkpoint.pt'}", file=sys.stderr)
        raise
    if not ranks.main:
        return 0
    if run.done >= args.epochs:
        run.save(run.done)
    if run.history and not args.no_plot:
        plots.plot_curves(run.history, out / "curves.png", title=f"{args.variant} on {args.dataset}",
                          best_epoch=run.best["epoch"] if run.best is not None else None)

    final = run.history[-1]["test_accuracy"] if run.history else None
    summary = [f"final test accuracy {final:.2%}" if final is not None else "no epochs trained"]
    if (best := run.best) is not None:
        summary.append(f"best.pt: epoch {best['epoch']}, validation accuracy {best['val_accuracy']:.2%} "
                       f"(test accuracy {best['test_accuracy']:.2%})")
    print(*summary, f"outputs in {out}", sep=" | ")
    if args.target_accuracy is not None and (final is None or final < args.target_accuracy):
        print(f"test accuracy below the target {args.target_accuracy:.2%}", file=sys.stderr)
        return 1
    return 0


def _hold_out(split: data.Split, args: argparse.Namespace) -> data.HeldOut:
    """The images to train on, and the --val-split images to validate on (None without --val-split)."""
    from fastlenet import data

    if args.val_split is None:
        return data.HeldOut(split, None)
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


if __name__ == "__main__":
    sys.exit(main())
