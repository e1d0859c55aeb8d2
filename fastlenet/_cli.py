"""What the command-line tools (fastlenet.train, fastlenet.evaluate, fastlenet.predict) share.

Error discipline: a mistake the user can fix (a bad flag value, an unwritable directory, missing data,
a checkpoint that does not fit) ends the program with one line `error: ...` on stderr and exit status
2, never a traceback; Ctrl-C ends it with status 130. A traceback means a bug in fastlenet.
Everything written to disk goes through a temp file and os.replace, so an interrupted run leaves
either the previous file or the new one, never half of one.

Nothing heavy is imported here at the top: building a parser and answering --help or a bad flag
needs only argparse, and PyTorch (seconds to import on a busy machine) loads once the flags are good.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import sys
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

# The choices of --model and --dataset: the names of fastlenet.models.VARIANTS (LeNet-5's variants)
# and NETWORKS (the tutorial networks), and fastlenet.data.DATASETS, spelled out because those
# modules import PyTorch. tests/test_cli.py holds them equal.
LENET5_NAMES = ("lenet5", "lenet5-classic", "lenet5-nopad")
TUTORIAL_NAMES = ("cnn", "convnet-bn", "alexnet")
MODEL_NAMES = LENET5_NAMES + TUTORIAL_NAMES
DATASET_NAMES = ("mnist", "fashion-mnist")
DEFAULT_DATA_DIR = "./data"

# The files a run leaves in its --out directory: fastlenet.train's, then fastlenet.evaluate's. A
# directory holding any of them holds a run, which train --overwrite removes (and nothing else).
RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.json", "curves.png",
             "evaluation.json", "confusion_matrix.png", "misclassified.png")

# Test images evaluated under Triton's interpreter unless --limit-test says otherwise: the
# interpreter takes a good fraction of a second per image, so all 10,000 would take an hour.
INTERPRETER_TEST_IMAGES = 100

EXIT_USAGE = 2  # argparse's own status for bad flags; used for every other user error too
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def run(body: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
        argv: list[str] | None) -> int:
    """Parse argv and run body(args), turning user errors into an exit status instead of a traceback."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2, argparse has printed why)
        return e.code if isinstance(e.code, int) else 0
    args._given = given_flags(parser, argv)
    try:
        return _run_body(body, args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout piped into `head` or the like, which has exited
        # Point stdout at /dev/null so that Python's final flush does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _run_body(body: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    from fastlenet.data import DataError  # imports PyTorch: only now that the flags are good

    try:
        return body(args) or 0
    except (CLIError, DataError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults in --help, except the uninformative None and False of optional flags. In a
    description or epilog, lines indented by two spaces (commands) are kept as they are; the rest
    is reflowed as argparse does, paragraph by paragraph."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        blocks, prose = [], []
        for line in text.splitlines() + [""]:
            if line.startswith("  ") or not line.strip():
                if prose:
                    blocks.append(super()._fill_text(" ".join(prose), width, indent))
                    prose = []
                if line.strip():
                    blocks.append(indent + line)
                elif blocks and blocks[-1]:
                    blocks.append("")  # a blank line between paragraphs, kept once
            else:
                prose.append(line)
        return "\n".join(blocks).rstrip("\n")


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the options present on the command line (as opposed to defaults).

    argparse fills in a default only where the namespace lacks the attribute, so parsing into a
    namespace pre-filled with a marker leaves the marker exactly where nothing was given.
    """
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=namespace)
    return {dest for dest, value in vars(namespace).items() if value is not unset}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def choose_device(name: str) -> torch.device:
    """auto: CUDA when there is a GPU, else the CPU. Asking for CUDA without one is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
                       "use --device cpu or --device auto")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def check_fused(device: torch.device, args: argparse.Namespace) -> None:
    """The fused model needs CUDA, or Triton's interpreter on the CPU (switched on before Python starts).

    Under the interpreter the run goes on with a warning, on INTERPRETER_TEST_IMAGES test images
    unless args.limit_test asks for another number.
    """
    if not check_fused_backend(device):
        return
    tested = ""
    if args.limit_test is None:
        args.limit_test = INTERPRETER_TEST_IMAGES
        tested = f"; it tests on the first {args.limit_test} test images only (--limit-test N for more)"
    print("warning: --fused on the CPU runs the Triton kernels through Triton's interpreter "
          "(TRITON_INTERPRET=1): correct but very slow (about a second per training image), for "
          f"debugging: use a small --limit-train{tested}", file=sys.stderr)


def check_fused_backend(device: torch.device) -> bool:
    """Whether the fused model runs through Triton's interpreter on `device` (the CPU, with
    TRITON_INTERPRET=1); an error where it cannot run at all (the CPU without the interpreter)."""
    if device.type == "cuda":
        return False
    from fastlenet.kernels.launch import interpreting  # imports Triton: only for --fused

    if not interpreting():
        raise CLIError("--fused: the fused Triton kernels need a CUDA GPU, and there is none here; "
                       "set TRITON_INTERPRET=1 to run them on the CPU through Triton's interpreter "
                       "(slow, for debugging), or drop --fused to use the reference model on the CPU")
    quiet_interpreter_warnings()
    return True


def quiet_interpreter_warnings() -> None:
    """Triton's interpreter computes the masked-off lanes of every block too, in numpy, which warns
    about their overflows and NaNs; those lanes are never stored, so the warnings say nothing about
    the run and only bury its output."""
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")


def prepare_out_dir(path: Path) -> Path:
    """Create `path` if needed and make sure files can be written in it, before any work is done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise CLIError(f"--out {path}: cannot write there ({e.strerror or e})") from None
    return path


def write_bytes(path: Path, content: bytes) -> None:
    from fastlenet.data import atomic_write_bytes

    try:
        atomic_write_bytes(path, content)
    except OSError as e:
        raise CLIError(f"cannot write {path} ({e.strerror or e})") from None


def write_json(path: Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_torch(path: Path, obj) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def save_figure(path: Path, figure) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_bytes(path, buffer.getvalue())


def new_figure(**kwargs):
    """A matplotlib Figure on the Agg canvas. Imported here, not at the top: matplotlib costs a
    noticeable fraction of a short run's start-up, and pyplot's global state is not needed."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


# --------------------------------------------------------------------------------------------------
# Checkpoints: whatever the file holds, the user sees one line of ours, never PyTorch's text
# --------------------------------------------------------------------------------------------------

EPOCH_KEYS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_second", "seconds")


def unreadable(path: Path, why: str) -> CLIError:
    return CLIError(f"{path} is not a readable fastlenet checkpoint: {why}")


def short_repr(value: object, limit: int = 60) -> str:
    """repr() cut to `limit` characters: a value from a file, shown safely (repr escapes control
    characters, so no colour codes or line breaks from the file reach the terminal)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
