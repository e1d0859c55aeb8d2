"""Issue #4 end to end: `python -m fastlenet.train --fused` trains, and takes the reference's path.

On a machine without CUDA the fused kernels run through Triton's interpreter (conftest.py), so the
run is tiny: 16 images, batch 8, two epochs.
"""
import json

import pytest
import torch

from fastlenet import train

# SGD, not Adam: Adam is invariant to the gradient's scale, so it would hide a wrong loss gradient.
TINY = ["--limit-train", "16", "--limit-test", "16", "--batch-size", "8", "--epochs", "2",
        "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--schedule", "none",
        "--seed", "3", "--no-plot"]


@pytest.fixture(scope="module")
def runs(mnist_dir, tmp_path_factory):
    """The same tiny run, fused and reference, on the same device."""
    out = {}
    for name, extra in (("fused", ["--fused"]), ("reference", [])):
        path = tmp_path_factory.mktemp(name)
        assert train.main([*TINY, *extra, "--data-dir", str(mnist_dir), "--out", str(path)]) == 0
        out[name] = (path, json.loads((path / "metrics.json").read_text()))
    return out


def test_fused_run_lowers_the_loss(runs):
    _, metrics = runs["fused"]
    assert metrics["fused"] is True
    first, last = metrics["epochs"]
    assert last["train_loss"] < first["train_loss"]
    assert last["test_loss"] < first["test_loss"]


def test_fused_and_reference_runs_agree(runs):
    (_, fused), (_, ref) = runs["fused"], runs["reference"]
    for f, r in zip(fused["epochs"], ref["epochs"]):
        for key in ("train_loss", "test_loss"):
            assert f[key] == pytest.approx(r[key], rel=1e-4), key
        assert abs(f["test_accuracy"] - r["test_accuracy"]) <= 0.002


def test_a_fused_checkpoint_evaluates_on_the_reference_path(runs, mnist_dir, tmp_path, capsys):
    path, metrics = runs["fused"]
    checkpoint = torch.load(path / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["fused"] is True
    # Resume on the reference path for one more epoch: same state_dict keys, same optimizer state.
    out = tmp_path / "resumed"
    assert train.main(["--resume", str(path / "checkpoint.pt"), "--epochs", "3", "--data-dir",
                       str(mnist_dir), "--out", str(out), "--no-plot"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["fused"] is False and len(resumed["epochs"]) == 3
    assert resumed["epochs"][:2] == metrics["epochs"]
