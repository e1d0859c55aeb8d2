"""Shared test set-up.

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

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# What the kernel tests share: the PyTorch compositions the kernels are checked against, the error
# measure, and NaN-poisoned kernel outputs (a test module opts in with
# `pytestmark = pytest.mark.usefixtures("poisoned")`).
def _act(name):
    import torch.nn.functional as F

    return {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "identity": lambda t: t}[name]


def _pool(name):
    import torch.nn.functional as F

    # None: no pooling (the kernel size argument is ignored).
    return {"max": F.max_pool2d, "avg": F.avg_pool2d, None: lambda t, size: t}[name]


ACT = {name: _act(name) for name in ("relu", "sigmoid", "tanh", "identity")}
POOL = {name: _pool(name) for name in ("max", "avg", None)}


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    """The command-line tools' contract for a user error: exit status 2 and one line `error: ...` on
    stderr, holding each of `fragments`; never a traceback."""
    assert status == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture
def poisoned():
    """Kernel outputs allocated full of NaN (127 for integers), so an unwritten element fails."""
    from fastlenet.kernels.launch import poison_outputs

    with poison_outputs():
        yield


def set_tf32(enabled: bool):
    """Switch TF32 for float32 convolutions and matmuls, the way a user would (the fp32_precision
    API where this torch has it, else the legacy flags); returns a function that restores the
    previous settings."""
    value = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        saved = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
        torch.backends.cudnn.conv.fp32_precision = value
        torch.backends.cuda.matmul.fp32_precision = value

        def restore():
            torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved
    else:
        saved = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
        torch.backends.cudnn.allow_tf32 = enabled
        torch.set_float32_matmul_precision("high" if enabled else "highest")

        def restore():
            torch.backends.cudnn.allow_tf32 = saved[0]
            torch.set_float32_matmul_precision(saved[1])
    return restore


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
