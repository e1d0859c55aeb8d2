"""A training run on disk: what fastlenet.train saves after each epoch and how it is read back.

A run's --out directory holds checkpoint.pt (weights, optimizer, schedule and batch-order states,
the history: everything --resume needs), metrics.json, curves.png, and with --val-split best.pt (the
weights of the epoch that did best on the validation split); fastlenet.evaluate adds its report.
Every file is written atomically (fastlenet.files).

Whatever a checkpoint file holds, the user sees one line of ours, never PyTorch's text:
load_checkpoint reads it with weights_only=True (no code in it runs) and checks its archive, its
pickle and the types of what it holds; Run.resume checks the optimizer, schedule and batch-order
states against a fresh run's before any step reads them.

PyTorch is imported inside the functions that use it, so that the command-line tools can import
this module and still answer --help at once.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import io
import pickle
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastlenet.cli import CLIError, short_repr
from fastlenet.files import save_torch, temp_files, write_json
from fastlenet.names import DATASET_NAMES, MODEL_NAMES

if TYPE_CHECKING:
    import torch

# The files a run leaves in its --out directory: fastlenet.train's, then fastlenet.evaluate's. A
# directory holding any of them holds a run, which train --overwrite removes (and nothing else).
RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.json", "curves.png",
             "evaluation.json", "confusion_matrix.png", "misclassified.png")

EPOCH_KEYS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_second", "seconds")

# Settings that define a training run: --resume takes them from the checkpoint, and giving one of
# them with another value than the checkpoint's is an error rather than a silently different run.
RUN_SETTINGS = ("variant", "dataset", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                "schedule", "seed", "limit_train", "limit_test", "augment", "val_split")
# Run settings that checkpoints of earlier versions do not record, with the value their runs had.
LATER_SETTINGS = {"val_split": None}


# --------------------------------------------------------------------------------------------------
# Saving, after every epoch
# --------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """A training run as fastlenet.train saves it into `out` after every epoch (save), and as
    --resume restores it (resume): the training state, the history of finished epochs, and with
    --val-split the best epoch so far and its weights."""
    out: Path
    config: dict  # the run's settings, as the flags gave them
    info: dict  # what metrics.json says of where the run ran: device, fused, dataset source, torch
    data_dir: str  # absolute: fastlenet.evaluate reads the test files from there
    model: Any
    optimizer: Any
    generator: Any  # the batch order's
    scheduler: Any = None
    done: int = 0  # epochs finished, restored ones included
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    best: dict | None = None  # with --val-split: the history record of the best epoch
    best_weights: dict | None = None
    saved: list[int] = field(default_factory=list)  # epochs whose checkpoint is on disk in `out`

    def add(self, record: dict, best_of: bool) -> None:
        """The record of a finished epoch; with best_of (a --val-split run), the model's weights are
        kept as best.pt's if the epoch beats the best so far."""
        self.history.append(record)
        if best_of and improves(record, self.best):
            self.best = record
            self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def save(self, epoch: int) -> None:
        """best.pt (with --val-split), checkpoint.pt and metrics.json, as of `epoch`."""
        import fastlenet

        history, best = self.history, self.best
        if best is not None:  # before checkpoint.pt, which must never name a best epoch best.pt lacks
            save_torch(self.out / "best.pt", {
                "model": self.best_weights, "config": self.config, "epoch": best["epoch"],
                "epochs": [h for h in history if h["epoch"] <= best["epoch"]], "data_dir": self.data_dir,
                "fastlenet": fastlenet.__version__})
        save_torch(self.out / "checkpoint.pt", {
            "model": self.model.state_dict(), "optimizer": _plain_numbers(self.optimizer.state_dict()),
            "scheduler": _plain_numbers(self.scheduler.state_dict()) if self.scheduler else None, "epoch": epoch,
            "config": self.config, "epochs": history, "generator": self.generator.get_state(),
            "data_dir": self.data_dir, "fastlenet": fastlenet.__version__,
            "best": {"epoch": best["epoch"], "model": self.best_weights} if best is not None else None})
        write_json(self.out / "metrics.json", {
            "config": self.config, **self.info, "epochs": history,
            "test_accuracy": history[-1]["test_accuracy"] if history else None, "best": best})
        self.saved.append(epoch)

    def resume(self, checkpoint: dict, path: Path, settings, total_steps: int, keep_best: bool) -> None:
        """Weights, optimizer state, batch order and history from `checkpoint` (read by
        load_checkpoint from `path`), checked first; with keep_best (a --val-split run), the best
        epoch so far too. The run's settings (the parsed flags) say what a fresh run's states are."""
        load_weights(self.model, checkpoint["model"], path)
        _check_resumable(checkpoint, path, self.model, settings, total_steps)
        state = checkpoint["optimizer"]
        # The kernel choice is this run's (a CUDA checkpoint may resume on the CPU and back); setting it
        # before loading also puts Adam's step counters where that kernel wants them.
        defaults = self.optimizer.defaults
        for group in state["param_groups"]:
            group.update(fused=defaults.get("fused"), foreach=defaults.get("foreach"))
            if "capturable" in defaults:
                group["capturable"] = defaults["capturable"]
        self.optimizer.load_state_dict(state)
        self.generator.set_state(checkpoint["generator"])
        self.done, self.history = checkpoint["epoch"], list(checkpoint.get("epochs", []))
        if keep_best and self.done:
            self.best, self.best_weights = _restore_best(checkpoint, path, self.model, self.history)


def improves(record: dict, best: dict | None) -> bool:
    """Whether the epoch `record` is better than the best so far (None: none yet), judged on the
    validation split alone: a higher accuracy; at equal accuracy a lower loss; at equal both, the
    earlier epoch stays. The test split never takes part."""
    return best is None or (record["val_accuracy"], -record["val_loss"]) > (best["val_accuracy"], -best["val_loss"])


def _plain_numbers(state: dict) -> dict:
    """A state_dict with its 1-element tensor learning rates (see engine.lr_as_tensors) as plain
    numbers, so that a checkpoint is the same with and without a CUDA graph (the optimizer's
    per-parameter state is left as it is)."""
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


# --------------------------------------------------------------------------------------------------
# The --out directory
# --------------------------------------------------------------------------------------------------

def fresh_run_dir() -> Path:
    """runs/<timestamp>/, with -1, -2, ... where that exists: the default --out."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path("runs") / stamp, 1
    while path.exists():
        path, n = Path("runs") / f"{stamp}-{n}", n + 1
    return path


def earlier_run(out: Path, resume: str | None, overwrite: bool) -> list[str]:
    """The files of an earlier run in `out` that --overwrite is to remove (none without it).

    Training into a directory that holds a run would replace its checkpoint and leave its other files
    (an evaluation of the old weights) beside the new ones; so that is an error, except for --resume
    into the checkpoint's own directory, which continues that run.
    """
    try:
        found = [name for name in RUN_FILES if (out / name).is_file()]
    except OSError:  # not a directory one can look into: prepare_out_dir says why
        return []
    continuing = resume is not None and out.resolve() == Path(resume).resolve().parent
    if continuing:
        if overwrite:
            raise CLIError(f"--overwrite with --resume {resume}: --out {out} is the checkpoint's own "
                           "directory, whose run this continues; drop --overwrite, or choose another --out")
        return []
    if not found or overwrite:
        return found
    resume_it = (f"continue it with --resume {out / 'checkpoint.pt'}, "
                 if "checkpoint.pt" in found and resume is None else "")
    raise CLIError(f"--out {out} already holds a run ({', '.join(found)}): {resume_it}replace it with --overwrite, "
                   "or choose another --out")


def remove_run(out: Path, names: list[str]) -> None:
    """Remove the run files `names` from `out`, and the temporary files an interrupted write of one
    of them may have left (see files.atomic_write_bytes); nothing else."""
    paths = [out / name for name in names]
    paths += [p for name in RUN_FILES for p in temp_files(out, name)]
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise CLIError(f"--overwrite: cannot remove {path} ({e.strerror or e})") from None
    print(f"--overwrite: removed the earlier run's {', '.join(names)} from {out}")


# --------------------------------------------------------------------------------------------------
# Reading a checkpoint
# --------------------------------------------------------------------------------------------------

def unreadable(path: Path, why: str) -> CLIError:
    return CLIError(f"{path} is not a readable fastlenet checkpoint: {why}")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by fastlenet.train, read with weights_only=True (no code in it runs) and
    checked before anything uses it: its archive, its pickle, and the types of what it holds."""
    if not path.is_file():
        raise CLIError(f"checkpoint {path} does not exist" if not path.exists() else f"checkpoint {path} is not a file")
    try:
        content = path.read_bytes()
    except OSError as e:
        raise CLIError(f"cannot read checkpoint {path} ({e.strerror or e})") from None
    if why := _archive_problem(content):
        raise unreadable(path, why)
    checkpoint = _unpickle(content, path)
    if why := _contents_problem(checkpoint):
        raise unreadable(path, why)
    return checkpoint


def _archive_problem(content: bytes) -> str | None:
    """What is wrong with `content` as the zip archive torch.save writes, or None."""
    if not content:
        return "the file is empty"
    if not content.startswith(b"PK\x03\x04"):
        return "not a zip archive (torch.save writes one)"
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            names = archive.namelist()
            damaged = archive.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError):
        return "truncated or damaged (its zip directory cannot be read)"
    if damaged is not None:
        return f"damaged (the checksum of {short_repr(damaged)} in its archive does not match)"
    if not any(name.endswith("/data.pkl") for name in names):
        return "a zip archive, but not one written by torch.save (it has no data.pkl)"
    return None


def _unpickle(content: bytes, path: Path):
    import torch

    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol: the outcome says enough
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if found := re.search(r"GLOBAL ([\w.]+)", str(e)):
            raise unreadable(path, f"it holds a {found.group(1)} object, which loading with weights_only=True "
                                   "refuses (fastlenet writes only tensors and plain values)") from None
        raise unreadable(path, "its pickled contents are damaged or hold objects that loading with "
                               "weights_only=True refuses") from None
    except Exception:  # noqa: BLE001 - torch.load fails in many ways on a damaged archive; all mean this
        raise unreadable(path, "damaged (torch.load cannot rebuild its contents)") from None


def _contents_problem(checkpoint) -> str | None:
    """What keeps `checkpoint` from being the dict fastlenet.train writes, or None. The optimizer,
    schedule and generator states are train's to check, when it resumes."""
    if not isinstance(checkpoint, dict):
        return f"it holds a {type(checkpoint).__name__}, not the dict that fastlenet.train writes"
    if missing := [key for key in ("model", "config", "epoch") if key not in checkpoint]:
        return f"it has no {', '.join(missing)} entry"
    model, config, epoch = checkpoint["model"], checkpoint["config"], checkpoint["epoch"]
    if not is_state_dict(model):
        return "its model entry is not a state_dict of tensors"
    if not isinstance(config, dict):
        return f"its config entry is a {type(config).__name__}, not a dict"
    if type(epoch) is not int or epoch < 0:
        return f"its epoch entry is {short_repr(epoch)}, not a number of epochs"
    for key, names in (("variant", MODEL_NAMES), ("dataset", DATASET_NAMES)):
        if key in config and config[key] not in names:
            return f"its {key} {short_repr(config[key])} is none of {', '.join(names)}"
    history = checkpoint.get("epochs", [])
    if not isinstance(history, list) or not all(
            isinstance(h, dict) and all(type(h.get(k)) in (int, float) for k in EPOCH_KEYS) for h in history):
        return f"its epochs entry is not a list of per-epoch records ({', '.join(EPOCH_KEYS)})"
    return None


def is_state_dict(state) -> bool:
    """Whether `state` is a model's state_dict as fastlenet writes it: names to tensors (not only
    floating-point ones: BatchNorm counts its batches in an int64 buffer; load_weights checks each
    tensor's kind against the model's)."""
    import torch

    return isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())


def checkpoint_model(checkpoint: dict, path: Path, fused: bool, device: torch.device) -> torch.nn.Module:
    """The model of `checkpoint` (from load_checkpoint), its weights loaded: the reference model, or
    the fused one for fused=True, whichever path trained it (their state_dicts are the same)."""
    from fastlenet.models import build_model

    model = build_model(checkpoint["config"].get("variant", "lenet5"), fused=fused).to(device)
    load_weights(model, checkpoint["model"], path)
    return model


def load_weights(model: torch.nn.Module, state: dict, path: Path) -> None:
    """Load `state` (checked by load_checkpoint) into `model`, or say in one line why it does not fit."""
    expected = model.state_dict()
    problems = []
    if missing := sorted(expected.keys() - state.keys()):
        problems.append(f"no {_some(missing)}")
    if unexpected := sorted(state.keys() - expected.keys()):
        problems.append(f"unknown {_some(unexpected)}")
    shapes = [f"{name} is {_shape(state[name])}, the model's {_shape(expected[name])}"
              for name in expected if name in state and state[name].shape != expected[name].shape]
    if shapes:
        problems.append(_some(shapes, quote=False))
    # load_state_dict would cast integers into a float parameter without a word.
    kinds = [f"{name} holds {state[name].dtype} values, the model's {expected[name].dtype}" for name in expected
             if name in state and state[name].is_floating_point() != expected[name].is_floating_point()]
    if kinds:
        problems.append(_some(kinds, quote=False))
    if problems:
        raise CLIError(f"checkpoint {path} does not fit a {model.variant!r} model: {'; '.join(problems)}")
    model.load_state_dict(state)


def _some(items: list[str], quote: bool = True, shown: int = 3) -> str:
    listed = ", ".join(short_repr(i) if quote else i for i in items[:shown])
    return listed + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _shape(tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "a scalar"


# --------------------------------------------------------------------------------------------------
# Resuming: the run's settings, and the states a fresh run's must share
# --------------------------------------------------------------------------------------------------

def load_to_resume(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict | None:
    """The checkpoint that args.resume names (None without one), loaded and checked, its run
    settings adopted into args (see adopt_run_settings); `parser` is the one that parsed args."""
    if not args.resume:
        return None
    checkpoint = load_checkpoint(Path(args.resume))
    adopt_run_settings(args, checkpoint["config"], parser)
    return checkpoint


def adopt_run_settings(args: argparse.Namespace, saved: dict, parser: argparse.ArgumentParser) -> None:
    """--resume continues the saved run: its settings apply unless a flag given now disagrees."""
    actions = {action.dest: action for action in parser._actions}
    saved = {**LATER_SETTINGS, **saved}
    for key in RUN_SETTINGS:
        if key not in saved:
            continue
        flag = "--" + key.replace("_", "-")
        if not _valid_setting(actions[key], saved[key]):
            raise unreadable(Path(args.resume), f"its {key} {short_repr(saved[key])} is not a value of {flag}")
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


def _check_resumable(checkpoint: dict, path: Path, model, settings, total_steps: int) -> None:
    """The optimizer, schedule and batch-order states of `checkpoint` have the types and shapes of a
    fresh run's after one step, so that no step fails later on a value read from the file (which
    load_state_dict takes on trust)."""
    import torch

    from fastlenet import engine

    probe = copy.deepcopy(model)  # a throwaway copy: the probing step must not touch the weights
    fresh_optimizer = engine.build_optimizer(probe, settings)
    plain_keys = set(fresh_optimizer.param_groups[0])
    fresh_scheduler = engine.build_scheduler(fresh_optimizer, settings.schedule, total_steps, 0, None)  # adds its keys
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
        raise unreadable(path, why)


def _optimizer_state_problem(saved, fresh: dict, plain_keys: set) -> str | None:
    """What keeps the saved optimizer state from having the kinds of `fresh` (a state_dict), or None."""
    if (not isinstance(saved, dict) or not isinstance(saved.get("state"), dict)
            or not isinstance(saved.get("param_groups"), list)
            or len(saved["param_groups"]) != len(fresh["param_groups"])):
        return "its optimizer entry is not the state of the run's optimizer"
    for saved_group, group in zip(saved["param_groups"], fresh["param_groups"]):
        if not isinstance(saved_group, dict) or _kind(saved_group.get("params")) != _kind(group["params"]):
            return "its optimizer entry does not hold the model's parameters"
        for key, value in group.items():
            # The parameters are checked above; the optimizer's kernel choice is this run's.
            if key in ("params", "fused", "foreach", "capturable"):
                continue
            if (isinstance(value, bool) or value is None) and key in plain_keys:
                same = saved_group.get(key, value) == value  # a flag: torch fills in a missing one
            else:  # a number, or a key the schedule needs (e.g. initial_lr)
                same = key in saved_group and _kind(saved_group[key]) == _kind(value)
            if not same:
                return f"its optimizer setting {key} is {short_repr(saved_group.get(key))}, which this run cannot take"
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


def _restore_best(checkpoint: dict, path: Path, model, history: list) -> tuple[dict, dict]:
    """The best epoch so far of a --val-split run (its history record) and its weights, from the
    checkpoint, checked: they are saved to best.pt as they are."""
    best = checkpoint.get("best")
    if not isinstance(best, dict) or type(best.get("epoch")) is not int or not is_state_dict(best.get("model")):
        raise unreadable(path, "its best entry is not the best epoch and its weights, which a --val-split run keeps")
    record = next((h for h in history if h["epoch"] == best["epoch"]), None)
    if record is None or not all(type(record.get(k)) in (int, float) for k in ("val_loss", "val_accuracy")):
        raise unreadable(path, f"its best epoch {short_repr(best['epoch'])} has no validation "
                               "loss and accuracy in its epochs entry")
    load_weights(copy.deepcopy(model), best["model"], path)  # names and shapes, on a throwaway copy
    return record, best["model"]
