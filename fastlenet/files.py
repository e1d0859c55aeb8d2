"""Every file fastlenet writes goes through here: a temp file beside the target, fsync, os.replace.

So an interrupted run leaves either the previous file or the whole new one, never half of one: the
datasets fastlenet.data fetches, the checkpoints, metrics and pictures of the command-line tools,
and the benchmarks' JSON. atomic_write_bytes raises the OSError as it comes; the other writers turn
it into a WriteError whose message names the file and says why, one line for the user.

Imports nothing heavy: PyTorch loads only for save_torch.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path


class WriteError(Exception):
    """A file could not be written; the message names it and says why."""


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one, never part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp file sits beside the target: os.replace is atomic only within one filesystem.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make shared data dirs unreadable to others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def temp_files(directory: Path, name: str) -> list[Path]:
    """The temp files that interrupted writes of `name` may have left in `directory`."""
    return list(Path(directory).glob(f".{name}.*.tmp"))


def write_bytes(path: Path, content: bytes) -> None:
    try:
        atomic_write_bytes(path, content)
    except OSError as e:
        raise WriteError(f"cannot write {path} ({e.strerror or e})") from None


def write_json(path: Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_torch(path: Path, obj) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())
