"""The tutorial networks through the command-line tools: trained with --model, checkpointed with
the stock parameter names, resumed, evaluated, and evaluated fused (through fastlenet.fuse) to the
same predictions. Small subsets of real MNIST on the CPU (the fused path under the interpreter)."""
import json

import pytest
import torch

from fastlenet import evaluate, train
from fastlenet.models import NETWORKS, build_model


@pytest.mark.parametrize("name", [pytest.param("cnn", marks=pytest.mark.slow), "convnet-bn"])
def test_train_resume_and_evaluate_a_tutorial_network(name, mnist_dir, tmp_path):
    small = ["--limit-train", "256", "--limit-test", "64", "--batch-size", "64", "--data-dir", str(mnist_dir),
             "--no-plot"]
    assert train.main(["--model", name, "--epochs", "1", "--out", str(tmp_path / "run"), *small]) == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["variant"] == name
    assert list(checkpoint["model"]) == list(NETWORKS[name]().state_dict())  # stock names

    # --model is taken from the checkpoint on resume.
    assert train.main(["--resume", str(tmp_path / "run" / "checkpoint.pt"), "--epochs", "2",
                       "--out", str(tmp_path / "resumed"), *small]) == 0
    assert [e["epoch"] for e in json.loads((tmp_path / "resumed" / "metrics.json").read_text())["epochs"]] == [1, 2]

    # The fused form evaluates the same checkpoint to the same predictions.
    results = {}
    for fused in (False, True):
        out = tmp_path / f"eval-{fused}"
        args = [str(tmp_path / "resumed" / "checkpoint.pt"), "--limit-test", "16", "--data-dir", str(mnist_dir),
                "--out", str(out)] + (["--fused"] if fused else [])
        assert evaluate.main(args) == 0
        results[fused] = json.loads((out / "evaluation.json").read_text())
    assert results[True]["test_accuracy"] == results[False]["test_accuracy"]
    assert results[True]["confusion_matrix"] == results[False]["confusion_matrix"]


def test_every_network_builds_both_ways():
    for name in NETWORKS:
        stock, fused = build_model(name), build_model(name, fused=True)
        assert list(stock.state_dict()) == list(fused.state_dict())
        assert stock.variant == fused.variant == name
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_run_of_a_few_steps_trains(steps, mnist_dir, tmp_path):
    # OneCycleLR cannot build a cycle of fewer than 5 steps; a run that short must still train.
    assert train.main(["--limit-train", str(16 * steps), "--batch-size", "16", "--epochs", "1", "--limit-test", "16",
                       "--data-dir", str(mnist_dir), "--out", str(tmp_path), "--no-plot"]) == 0
