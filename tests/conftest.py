"""The tests' fixtures, and the environment they run in (helpers shared by several test files are in
utils.py).

Triton's interpreter must be switched on before triton is first imported, so this runs at collection
time: with no CUDA device, every Triton kernel in the tests runs on the CPU through the interpreter
(numpy does the arithmetic). On a CUDA machine the compiled kernels are tested instead.
"""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# torch.compile's on-disk caches key a compiled graph on the graph, not on fastlenet's fake (meta)
# implementations or kernels: a graph cached by an earlier version of them would be reused with the
# old output shapes. Each test session compiles into a fresh cache.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastlenet-tests-inductor-")

import pathlib

import pytest

from utils import REPO, set_tf32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poisoned():
    """Kernel outputs allocated full of NaN (127 for integers), so an unwritten element fails (a test
    module opts in with `pytestmark = pytest.mark.usefixtures("poisoned")`)."""
    from fastlenet.kernels.launch import poison_outputs

    with poison_outputs():
        yield


@pytest.fixture(autouse=True)
def _ieee_float32(request):
    """On CUDA, float32 convolutions default to TF32 (10-bit mantissas), in PyTorch's cuDNN calls and
    in the fused kernels alike, which no 1e-5 parity test survives. Every test runs with TF32 off
    unless it asks for the `tf32` fixture, whose tolerances allow for what TF32 changes."""
    if not torch.cuda.is_available() or "tf32" in request.fixturenames:
        yield
        return
    restore = set_tf32(False)
    try:
        yield
    finally:
        restore()


@pytest.fixture
def tf32():
    restore = set_tf32(True)
    try:
        yield
    finally:
        restore()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def mnist_dir() -> pathlib.Path:
    """A directory holding verified real MNIST (torchvision layout), fetched once if absent.

    Uses $FASTLENET_TEST_DATA, else the repository's ./data (the CLI's default), so a developer's
    copy is reused and CI fetches it once per run through fastlenet.data's normal source chain.
    """
    from fastlenet import data

    root = pathlib.Path(os.environ.get("FASTLENET_TEST_DATA", REPO / "data"))
    data.load("mnist", root)  # fetches and verifies, or raises DataError with the reason
    return root
