"""What the command-line tools (fastlenet.train, fastlenet.evaluate, fastlenet.predict) and the
benchmarks share: the run wrapper and its error discipline, the help formatter, argument types, and
the one device chooser.

Error discipline: a mistake the user can fix (a bad flag value, an unwritable directory, missing data,
a checkpoint that does not fit) ends the program with one line `error: ...` on stderr and exit status
2, never a traceback; Ctrl-C ends it with status 130. A traceback means a bug in fastlenet.
Everything written to disk goes through fastlenet.files (a temp file and os.replace), so an
interrupted run leaves either the previous file or the new one, never half of one.

Nothing heavy is imported here at the top: building a parser and answering --help or a bad flag
needs only argparse, and PyTorch (seconds to import on a busy machine) loads once the flags are good.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

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


def short_repr(value: object, limit: int = 60) -> str:
    """repr() cut to `limit` characters: a value from a file, shown safely (repr escapes control
    characters, so no colour codes or line breaks from the file reach the terminal)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
    from fastlenet.files import WriteError

    try:
        return body(args) or 0
    except (CLIError, DataError, WriteError) as e:
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


def fraction(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"is a fraction in [0, 1] (0.99 for 99%), got {text}")
    return value


DEVICE_CHOICES = ("auto", "cpu", "cuda")  # --device of every tool and benchmark


def choose_device(name: str) -> torch.device:
    """The device for --device `name` (one of DEVICE_CHOICES): auto is CUDA when there is a GPU, else
    the CPU. Asking for CUDA without one is an error."""
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
    """The fused model needs CUDA, or Triton's interpreter on the CPU (switched on before Python starts),
    and in bfloat16 (args.amp, where the tool has --amp) CUDA.

    Under the interpreter the run goes on with a warning, on INTERPRETER_TEST_IMAGES test images
    unless args.limit_test asks for another number.
    """
    if getattr(args, "amp", "off") == "bf16" and device.type != "cuda":
        raise CLIError("--amp bf16 with --fused needs a CUDA GPU: Triton's interpreter computes bfloat16 "
                       "dot products wrongly; use --amp fp16 here, or drop --fused")
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
    return True


def prepare_out_dir(path: Path, flag: str = "--out") -> Path:
    """Create `path` (the value of `flag`) if needed and make sure files can be written in it, before
    any work is done."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag} {path}: it is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise CLIError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return path


