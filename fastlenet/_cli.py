"""What the two command-line tools (fastlenet.train, fastlenet.evaluate) share.

Error discipline: a mistake the user can fix (a bad flag value, an unwritable directory, missing data,
a checkpoint that does not fit) ends the program with one line `error: ...` on stderr and exit status
2, never a traceback; Ctrl-C ends it with status 130. A traceback means a bug in fastlenet.
Everything written to disk goes through a temp file and os.replace, so an interrupted run leaves
either the previous file or the new one, never half of one.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from fastlenet.data import DataError, atomic_write_bytes

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
        return body(args) or 0
    except (CLIError, DataError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout piped into `head` or the like, which has exited
        # Point stdout at /dev/null so that Python's final flush does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults in --help, except the uninformative None and False of optional flags."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
                       "use --device cpu or --device auto")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def check_fused(device: torch.device) -> None:
    """The fused model needs CUDA, or Triton's interpreter on the CPU (switched on before Python starts)."""
    if device.type == "cuda":
        return
    from fastlenet.kernels.launch import interpreting  # imports Triton: only for --fused

    if interpreting():
        print("warning: --fused on the CPU runs the Triton kernels through Triton's interpreter "
              "(TRITON_INTERPRET=1): correct but very slow, for debugging; use a small --limit-train",
              file=sys.stderr)
        return
    raise CLIError("--fused: the fused Triton kernels need a CUDA GPU, and there is none here; "
                   "set TRITON_INTERPRET=1 to run them on the CPU through Triton's interpreter "
                   "(slow, for debugging), or drop --fused to use the reference model on the CPU")


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
    try:
        atomic_write_bytes(path, content)
    except OSError as e:
        raise CLIError(f"cannot write {path} ({e.strerror or e})") from None


def write_json(path: Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_torch(path: Path, obj) -> None:
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


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by fastlenet.train, read with weights_only=True (no code runs on load)."""
    if not path.is_file():
        raise CLIError(f"checkpoint {path} does not exist" if not path.exists() else f"checkpoint {path} is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file; all mean "unreadable"
        raise CLIError(f"cannot read checkpoint {path}: {type(e).__name__}: {one_line(e)[:200]}") from None
    if not isinstance(checkpoint, dict) or not {"model", "config", "epoch"} <= checkpoint.keys():
        raise CLIError(f"{path} is not a fastlenet checkpoint (expected a dict with model, config and epoch)")
    return checkpoint


def load_weights(model: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CLIError(f"checkpoint {path} does not fit a {model.variant!r} model: {one_line(e)[:300]}") from None
