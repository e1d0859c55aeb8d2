"""Shared test set-up.

Triton's interpreter must be switched on before triton is first imported, so this runs at collection
time: with no CUDA device, every Triton kernel in the tests runs on the CPU through the interpreter
(numpy does the arithmetic). On a CUDA machine the compiled kernels are tested instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
