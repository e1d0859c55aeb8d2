"""The fused path end to end: `python -m fastlenet.train --fused` trains, and takes the reference's path.

On a machine without CUDA the fused kernels run through Triton's interpreter (conftest.py), so the
run is tiny: 16 images, batch 8, two epochs. The fused run is a subprocess, as a user starts it, so
that its whole stderr can be checked.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastlenet import cli, engine, train

from utils import REPO

INTERPRETED = not torch.cuda.is_available()

# SGD, not Adam: Adam is invariant to the gradient's scale, so it would hide a wrong loss gradient.
TINY = ["--limit-train", "16", "--limit-test", "16", "--batch-size", "8", "--epochs", "2",
        "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--schedule", "none",
        "--seed", "3", "--no-plot"]


# Two training runs, one through the interpreter (about a minute on 2 cores): the tests that use them
# are `slow`.
@pytest.fixture(scope="module")
def runs(mnist_dir, tmp_path_factory):
    """The same tiny run, fused (python -m fastlenet.train --fused) and reference, on the same device."""
    out = {}
    path = tmp_path_factory.mktemp("fused")
    env = dict(os.environ, **({"TRITON_INTERPRET": "1"} if INTERPRETED else {}))
    proc = subprocess.run([sys.executable, "-m", "fastlenet.train", *TINY, "--fused", "--data-dir", str(mnist_dir),
                           "--out", str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out["fused"] = (path, json.loads((path / "metrics.json").read_text()))
    out["fused stderr"] = proc.stderr
    path = tmp_path_factory.mktemp("reference")
    assert train.main([*TINY, "--data-dir", str(mnist_dir), "--out", str(path)]) == 0
    out["reference"] = (path, json.loads((path / "metrics.json").read_text()))
    return out


@pytest.mark.slow
def test_fused_run_says_one_warning_and_nothing_else(runs):
    """Under the interpreter: the warning, and none of numpy's RuntimeWarnings about the masked-off
    lanes the interpreter computes (and never stores)."""
    lines = runs["fused stderr"].splitlines()
    if INTERPRETED:
        assert len(lines) == 1 and lines[0].startswith("warning: --fused on the CPU"), runs["fused stderr"]
        assert "test images only" not in lines[0]  # --limit-test was given
    else:
        assert lines == [], runs["fused stderr"]


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter runs where there is no CUDA device")
def test_the_interpreter_tests_on_a_few_images_unless_told(mnist_dir, tmp_path, capsys, monkeypatch):
    """All 10,000 test images would take the interpreter about an hour: without --limit-test a fused
    run on the CPU tests on the first INTERPRETER_TEST_IMAGES, says so, and records it."""
    tested = []

    def evaluate(model, loss_fn, x, y, ranks=None):
        tested.append(len(x))
        return 2.3, 0.1

    # Stand-ins for the (interpreted, slow) training and test passes: this is about which images.
    monkeypatch.setattr(engine, "train_epoch", lambda *args, **kwargs: (2.3, 0.1, 1.0))
    monkeypatch.setattr(engine, "evaluate", evaluate)
    common = ["--fused", "--limit-train", "8", "--epochs", "1", "--no-plot", "--data-dir", str(mnist_dir)]
    capsys.readouterr()
    assert train.main([*common, "--out", str(tmp_path / "default")]) == 0
    err = capsys.readouterr().err
    assert tested == [cli.INTERPRETER_TEST_IMAGES] == [100]
    assert f"first {cli.INTERPRETER_TEST_IMAGES} test images only (--limit-test N for more)" in err
    metrics = json.loads((tmp_path / "default" / "metrics.json").read_text())
    assert metrics["config"]["limit_test"] == cli.INTERPRETER_TEST_IMAGES

    assert train.main([*common, "--limit-test", "300", "--out", str(tmp_path / "asked")]) == 0
    assert tested[-1] == 300 and "test images only" not in capsys.readouterr().err


@pytest.mark.slow
def test_fused_run_lowers_the_loss(runs):
    _, metrics = runs["fused"]
    assert metrics["fused"] is True
    first, last = metrics["epochs"]
    assert last["train_loss"] < first["train_loss"]
    assert last["test_loss"] < first["test_loss"]


@pytest.mark.slow
def test_fused_and_reference_runs_agree(runs):
    (_, fused), (_, ref) = runs["fused"], runs["reference"]
    for f, r in zip(fused["epochs"], ref["epochs"]):
        for key in ("train_loss", "test_loss"):
            assert f[key] == pytest.approx(r[key], rel=1e-4), key
        assert abs(f["test_accuracy"] - r["test_accuracy"]) <= 0.002


@pytest.mark.slow
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
