"""The two command-line tools, run in-process on small subsets of real MNIST, on the CPU.

A smoke run (512 training images, 2 epochs) is shared by the schema, checkpoint, resume and
evaluation tests; the error-path tests check the contract for user mistakes: exit status 2 and one
line `error: ...` on stderr, never a traceback. What a user sees before anything runs (--help, the
README) is checked in subprocesses and on the files themselves.
"""
import copy
import json
import os
import random
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from fastlenet import data, engine, evaluate, names, predict, train
from fastlenet.models import MODEL_NAMES, NETWORKS, VARIANTS, LeNet5

from utils import REPO, assert_one_line_error, run_cli

SMALL = ["--limit-train", "512", "--limit-test", "1000", "--batch-size", "128"]
EPOCH_KEYS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_second", "seconds"}


def run_train(capsys, *args) -> tuple[int, str, str]:
    return run_cli(capsys, train.main, *args)


@pytest.fixture(scope="module")
def smoke(mnist_dir, tmp_path_factory):
    """A finished 2-epoch run: (its --out directory, its metrics)."""
    out = tmp_path_factory.mktemp("smoke")
    status = train.main(SMALL + ["--epochs", "2", "--data-dir", str(mnist_dir), "--out", str(out)])
    assert status == 0
    return out, json.loads((out / "metrics.json").read_text())


# --------------------------------------------------------------------------------------------------
# A normal run: outputs, checkpoint, resume, target accuracy
# --------------------------------------------------------------------------------------------------

def test_metrics_json_schema(smoke):
    out, metrics = smoke
    assert {"config", "device", "fused", "epochs", "test_accuracy"} <= metrics.keys()
    assert metrics["device"] == "cpu" and metrics["fused"] is False
    assert metrics["config"]["limit_train"] == 512 and metrics["config"]["variant"] == "lenet5"
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for epoch in metrics["epochs"]:
        assert set(epoch) == EPOCH_KEYS
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in epoch.values())
        assert 0 <= epoch["train_accuracy"] <= 1 and 0 <= epoch["test_accuracy"] <= 1
        assert epoch["train_loss"] > 0 and epoch["images_per_second"] > 0 and epoch["seconds"] > 0
    assert metrics["test_accuracy"] == metrics["epochs"][-1]["test_accuracy"]
    assert metrics["epochs"][1]["train_loss"] < metrics["epochs"][0]["train_loss"]  # it learns
    assert metrics["test_accuracy"] > 0.25  # chance is 0.1; 8 steps of onecycle warm-up get ~0.4


def test_curves_png_written(smoke):
    out, _ = smoke
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_loads_weights_only_and_reproduces_accuracy(smoke, mnist_dir):
    out, metrics = smoke
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2
    assert checkpoint["config"] == metrics["config"]
    assert {"model", "optimizer", "scheduler"} <= checkpoint.keys()
    model = LeNet5(checkpoint["config"]["variant"])  # fresh, plain NCHW: the layout must not matter
    model.load_state_dict(checkpoint["model"])
    test = data.load("mnist", mnist_dir).test
    x, y = data.to_device(data.Split(test.images[:1000], test.labels[:1000]), "cpu", *data.NORMALIZATION["mnist"])
    _, accuracy = engine.evaluate(model, torch.nn.functional.cross_entropy, x, y)
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-3)  # at most one image flips


def test_resume_continues_the_run(smoke, mnist_dir, tmp_path, capsys):
    out, metrics = smoke
    status, stdout, _ = run_train(capsys, "--resume", out / "checkpoint.pt", "--epochs", 3,
                                  "--data-dir", mnist_dir, "--out", tmp_path)
    assert status == 0
    assert "epoch   3/3" in stdout and "epoch   1/3" not in stdout  # continued, not restarted
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2, 3]
    assert resumed["epochs"][:2] == metrics["epochs"]
    assert resumed["config"]["limit_train"] == 512  # the run's settings come from the checkpoint
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 3


def test_resume_at_the_last_epoch_trains_nothing(smoke, mnist_dir, tmp_path, capsys):
    out, metrics = smoke
    status, stdout, _ = run_train(capsys, "--resume", out / "checkpoint.pt", "--epochs", 2, "--no-plot",
                                  "--data-dir", mnist_dir, "--out", tmp_path)
    assert status == 0 and "nothing to train" in stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == metrics["epochs"]


def test_resume_matches_an_uninterrupted_run(mnist_dir, tmp_path, capsys):
    """2 epochs + resume to 3 == 3 epochs straight: weights, optimizer state and batch order carry over."""
    common = SMALL + ["--schedule", "none", "--no-plot", "--data-dir", mnist_dir]
    assert run_train(capsys, *common, "--epochs", 3, "--out", tmp_path / "straight")[0] == 0
    assert run_train(capsys, *common, "--epochs", 2, "--out", tmp_path / "split")[0] == 0
    # no --out: a resumed run writes beside its checkpoint
    assert run_train(capsys, "--resume", tmp_path / "split" / "checkpoint.pt", "--epochs", 3,
                     "--no-plot", "--data-dir", mnist_dir)[0] == 0
    straight, split = (json.loads((tmp_path / d / "metrics.json").read_text())["epochs"][-1]
                       for d in ("straight", "split"))
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert split[key] == pytest.approx(straight[key], rel=1e-5), key


@pytest.mark.parametrize("target, expected", [(0.9999, 1), (0.0, 0)])
def test_target_accuracy_sets_exit_status(mnist_dir, tmp_path, capsys, target, expected):
    status, _, err = run_train(capsys, "--limit-train", 256, "--limit-test", 500, "--epochs", 1, "--no-plot",
                               "--target-accuracy", target, "--data-dir", mnist_dir, "--out", tmp_path)
    assert status == expected
    assert ("below the target" in err) == (expected == 1)


def test_help_lists_every_flag(capsys):
    status, out, _ = run_train(capsys, "--help")
    assert status == 0
    for flag in ("--fused", "--variant", "--dataset", "--data-dir", "--epochs", "--batch-size", "--optimizer",
                 "--lr", "--momentum", "--weight-decay", "--schedule", "--seed", "--device", "--limit-train",
                 "--out", "--resume", "--target-accuracy", "--augment", "--limit-test", "--compile",
                 "--cuda-graph", "--no-cuda-graph", "--val-split", "--overwrite"):
        assert flag in out
    assert "(default: 128)" in out  # defaults are shown


def test_keyboard_interrupt_exits_130(mnist_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C in epoch 2: status 130, no traceback, and the way to resume epoch 1's checkpoint."""
    real_epoch, calls = engine.train_epoch, []

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(engine, "train_epoch", interrupted_in_epoch_2)
    status, _, err = run_train(capsys, *SMALL, "--epochs", 3, "--no-plot", "--data-dir", mnist_dir,
                               "--out", tmp_path)
    assert status == 130
    assert "interrupted" in err and "Traceback" not in err
    assert f"holds epoch 1: continue with --resume {tmp_path / 'checkpoint.pt'}" in err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1


# --------------------------------------------------------------------------------------------------
# User errors: exit status 2, one line
# --------------------------------------------------------------------------------------------------

def test_unwritable_out(mnist_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    status, _, err = run_train(capsys, *SMALL, "--data-dir", mnist_dir, "--out", blocker / "run")
    assert_one_line_error(status, err, "--out", "cannot write")


def test_data_error(tmp_path, capsys, monkeypatch):
    def unavailable(name, data_dir, **kwargs):
        raise data.DataError(f"cannot obtain MNIST (missing from {data_dir}/MNIST/raw).\nTried: nothing")

    monkeypatch.setattr(data, "load", unavailable)
    status, _, err = run_train(capsys, *SMALL, "--data-dir", tmp_path / "empty", "--out", tmp_path / "run")
    assert_one_line_error(status, err, "cannot obtain MNIST")


@pytest.mark.parametrize("where, fragment", [("a-file", "is a file, not a directory"),
                                              ("a-file/data", "cannot create or write")])
def test_unusable_data_dir_is_an_error_before_any_download(where, fragment, tmp_path, capsys, monkeypatch):
    def no_fetching(*args):
        raise AssertionError("fetched data into a directory that cannot keep it")

    monkeypatch.setattr(data, "_fetch", no_fetching)
    (tmp_path / "a-file").write_text("not a directory")
    status, _, err = run_train(capsys, *SMALL, "--data-dir", tmp_path / where, "--out", tmp_path / "run")
    assert_one_line_error(status, err, fragment, str(tmp_path / where))


def test_target_accuracy_in_percent_is_explained(tmp_path, capsys):
    status, _, err = run_train(capsys, "--target-accuracy", "99", "--out", tmp_path)
    assert status == 2 and "Traceback" not in err
    assert "(0.99 for 99%)" in err and "%%" not in err, err


def test_checkpoint_of_another_variant(smoke, mnist_dir, tmp_path, capsys):
    out, _ = smoke
    status, _, err = run_train(capsys, "--resume", out / "checkpoint.pt", "--variant", "lenet5-classic",
                               "--data-dir", mnist_dir, "--out", tmp_path)
    assert_one_line_error(status, err, "--variant lenet5", "lenet5-classic")


def test_checkpoint_whose_weights_do_not_fit(smoke, mnist_dir, tmp_path, capsys):
    out, _ = smoke
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["config"]["variant"] = "lenet5-nopad"  # fc1 is 256 -> 120 there, 400 -> 120 here
    torch.save(checkpoint, tmp_path / "mislabelled.pt")
    status, _, err = run_train(capsys, "--resume", tmp_path / "mislabelled.pt", "--epochs", 3,
                               "--data-dir", mnist_dir, "--out", tmp_path / "run")
    assert_one_line_error(status, err, "does not fit", "lenet5-nopad", "fc1.weight is 120x400, the model's 120x256")


def _raw(transform):
    """A checkpoint file made from the bytes of a good one."""
    def make(good, path):
        path.write_bytes(transform(good.read_bytes()))
    return make


def _edited(edit):
    """A checkpoint file that torch.load reads, holding a good checkpoint changed by edit(checkpoint)."""
    def make(good, path):
        checkpoint = torch.load(good, weights_only=True)
        edit(checkpoint)
        torch.save(checkpoint, path)
    return make


def _flip_middle(content: bytes) -> bytes:
    middle = len(content) // 2
    return content[:middle] + bytes([content[middle] ^ 0xFF]) + content[middle + 1:]


def _plain_zip(good, path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights.txt", "not a torch.save archive")


class Hostile:
    """Pickles as a call of os.system, which loading with weights_only=True must refuse to make."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile(good, path):
    torch.save({"model": Hostile(path.parent / "pwned"), "config": {}, "epoch": 1}, path)


def _exp_avg(checkpoint):  # the Adam state of the first parameter, in the wrong shape
    checkpoint["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)


# name: (how to make the file, what the one line says, whether evaluate reads that part too)
BAD_CHECKPOINTS = {
    "empty": (_raw(lambda b: b""), "the file is empty", True),
    "random bytes": (_raw(lambda b: random.Random(0).randbytes(len(b))), "not a zip archive", True),
    "text": (_raw(lambda b: b"definitely not a checkpoint"), "not a zip archive", True),
    "truncated": (_raw(lambda b: b[:len(b) // 2]), "truncated", True),
    "flipped byte": (_raw(_flip_middle), "damaged", True),
    "a plain zip": (_plain_zip, "not one written by torch.save", True),
    "hostile pickle": (_hostile, "weights_only=True refuses", True),
    "a list": (lambda good, path: torch.save([1, 2, 3], path), "holds a list", True),
    "no config": (_edited(lambda c: c.pop("config")), "no config", True),
    "model is a list": (_edited(lambda c: c.update(model=[1, 2])), "not a state_dict", True),
    "integer weights": (_edited(lambda c: c["model"].update({"fc3.bias": torch.zeros(10, dtype=torch.long)})),
                        "fc3.bias holds torch.int64 values, the model's torch.float32", True),
    "epoch is text": (_edited(lambda c: c.update(epoch="2")), "epoch entry is '2'", True),
    "history of tensors": (_edited(lambda c: c.update(epochs=[torch.ones(1)])), "epochs entry", True),
    "colour codes": (_edited(lambda c: c["config"].update(variant="\x1b[31mlenet5")), "variant", True),
    "wrong shapes": (_edited(lambda c: c["model"].update({"conv1.weight": torch.zeros(6, 1, 3, 3)})),
                     "conv1.weight is 6x1x3x3, the model's 6x1x5x5", True),
    "missing weights": (_edited(lambda c: c["model"].pop("fc2.bias")), "no 'fc2.bias'", True),
    "batch size as text": (_edited(lambda c: c["config"].update(batch_size="128")), "batch_size '128'", False),
    "lr as text": (_edited(lambda c: c["optimizer"]["param_groups"][0].update(lr="fast")), "lr is 'fast'", False),
    "no lr": (_edited(lambda c: c["optimizer"]["param_groups"][0].pop("lr")), "optimizer setting lr", False),
    "Adam state of another shape": (_edited(_exp_avg), "optimizer state", False),
    "Adam state without a moment": (_edited(lambda c: c["optimizer"]["state"][0].pop("exp_avg_sq")),
                                    "optimizer state", False),
    "no optimizer": (_edited(lambda c: c.pop("optimizer")), "optimizer entry", False),
    "generator": (_edited(lambda c: c.update(generator=torch.zeros(3))), "generator", False),
    "scheduler": (_edited(lambda c: c["scheduler"].update(_last_lr="x")), "scheduler state", False),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_one_line_of_ours(case, smoke, mnist_dir, tmp_path, capsys):
    """Whatever a checkpoint file holds, --resume and evaluate end with status 2 and one line saying
    what is wrong in our words: not PyTorch's unpickler text, a KeyError, or colour codes."""
    make, fragment, evaluated = BAD_CHECKPOINTS[case]
    path = tmp_path / "checkpoint.pt"
    make(smoke[0] / "checkpoint.pt", path)
    runs = [("train", lambda: train.main(["--resume", str(path), "--epochs", "3", "--data-dir", str(mnist_dir),
                                          "--out", str(tmp_path / "run")]))]
    if evaluated:
        runs.append(("evaluate", lambda: evaluate.main([str(path), "--data-dir", str(mnist_dir),
                                                        "--out", str(tmp_path / "eval")])))
    for tool, run in runs:
        capsys.readouterr()
        status = run()
        err = capsys.readouterr().err
        assert_one_line_error(status, err, fragment)
        assert str(path) in err, tool
        for raw_text in ("\x1b", "Weights only", "PytorchStreamReader", "Error", "file an issue"):
            assert raw_text not in err, (tool, raw_text, err)
        assert len(err) < 400, err
    assert not (tmp_path / "pwned").exists()  # the hostile payload never ran
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_missing_checkpoint(tmp_path, capsys):
    status, _, err = run_train(capsys, "--resume", tmp_path / "nowhere.pt", "--out", tmp_path / "run")
    assert_one_line_error(status, err, "does not exist")
    assert_one_line_error(evaluate.main([str(tmp_path), "--out", str(tmp_path / "eval")]), capsys.readouterr().err,
                          "is not a file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, capsys):
    status, _, err = run_train(capsys, "--device", "cuda", "--out", tmp_path)
    assert_one_line_error(status, err, "no CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fused_without_cuda_or_interpreter(tmp_path, capsys, monkeypatch):
    from fastlenet.kernels import launch

    # As in a process started without TRITON_INTERPRET (the kernels were compiled, not interpreted).
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    # A tiny run, so that a broken check fails fast instead of training through the interpreter.
    status, _, err = run_train(capsys, "--fused", "--limit-train", "4", "--limit-test", "4", "--epochs", "1",
                               "--out", tmp_path)
    assert_one_line_error(status, err, "need a CUDA GPU", "TRITON_INTERPRET=1", "interpreter")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fused_bf16_on_the_cpu_says_why(tmp_path, capsys):
    status, _, err = run_train(capsys, "--fused", "--amp", "bf16", "--limit-train", "4", "--limit-test", "4",
                               "--epochs", "1", "--out", tmp_path)
    assert_one_line_error(status, err, "--amp bf16 with --fused needs a CUDA GPU", "bfloat16", "--amp fp16")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_the_reference_model(amp, mnist_dir, tmp_path, capsys):
    status, out, _ = run_train(capsys, *SMALL, "--epochs", "1", "--amp", amp, "--data-dir", mnist_dir,
                               "--out", tmp_path, "--no-plot")
    assert status == 0 and "amp=" + amp in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["amp"] == amp and metrics["test_accuracy"] > 0.15  # it learns (chance 0.1)
    weights = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert all(w.dtype == torch.float32 for w in weights.values())  # float32 master weights


@pytest.mark.parametrize("flag", ["--batch-size", "--epochs"])
def test_non_positive_sizes_are_rejected(flag, tmp_path, capsys):
    status, _, err = run_train(capsys, flag, "0", "--out", tmp_path)
    assert status == 2
    assert "must be a positive integer" in err and "Traceback" not in err
    assert not (tmp_path / "metrics.json").exists()


# --------------------------------------------------------------------------------------------------
# python -m fastlenet.evaluate
# --------------------------------------------------------------------------------------------------

def test_evaluate_writes_report(smoke, mnist_dir, tmp_path, capsys):
    out, metrics = smoke
    capsys.readouterr()
    status = evaluate.main([str(out / "checkpoint.pt"), "--data-dir", str(mnist_dir), "--limit-test", "1000",
                            "--out", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert status == 0
    for png in ("confusion_matrix.png", "misclassified.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-3)
    confusion = torch.tensor(report["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 1000
    labels = data.load("mnist", mnist_dir).test.labels[:1000]
    assert confusion.sum(1).tolist() == torch.bincount(labels, minlength=10).tolist()  # rows: true class
    wrong = report["misclassified"][0]
    assert labels[wrong["index"]] == wrong["true"] != wrong["predicted"]
    assert confusion.diag().sum() / 1000 == pytest.approx(report["test_accuracy"])
    assert len(report["misclassified"]) == 1000 - confusion.diag().sum()
    assert set(report["per_class_accuracy"]) == {str(d) for d in range(10)}
    assert "per-class accuracy" in stdout and "test accuracy" in stdout


def test_evaluate_defaults_to_the_checkpoint_directory(smoke, mnist_dir, tmp_path, capsys):
    out, _ = smoke
    shutil.copy(out / "checkpoint.pt", tmp_path / "checkpoint.pt")
    assert evaluate.main([str(tmp_path / "checkpoint.pt"), "--data-dir", str(mnist_dir), "--limit-test", "200"]) == 0
    assert {"evaluation.json", "confusion_matrix.png", "misclassified.png"} <= {p.name for p in tmp_path.iterdir()}


def test_evaluate_needs_only_the_test_files(smoke, mnist_dir, tmp_path, monkeypatch):
    def no_fetching(*args):
        raise AssertionError("fetched files evaluate does not need")

    monkeypatch.setattr(data, "_fetch", no_fetching)
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copyfile(mnist_dir / "MNIST" / "raw" / f, raw / f)
    assert evaluate.main([str(smoke[0] / "checkpoint.pt"), "--data-dir", str(tmp_path / "data"), "--limit-test", "200",
                          "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["test_images"] == 200


# --------------------------------------------------------------------------------------------------
# --val-split: validation on held-out training images, and best.pt
# --------------------------------------------------------------------------------------------------

VAL = ["--limit-train", "512", "--limit-test", "200", "--batch-size", "128", "--val-split", "0.25"]
VAL_IMAGES, TRAIN_IMAGES, TEST_IMAGES = 128, 384, 200  # round(0.25 x 512), the rest, --limit-test
REAL_EVALUATE = engine.evaluate


@pytest.fixture(scope="module")
def val_run(mnist_dir, tmp_path_factory):
    """A finished 2-epoch --val-split run: (its --out directory, its metrics)."""
    out = tmp_path_factory.mktemp("val")
    assert train.main(VAL + ["--epochs", "2", "--data-dir", str(mnist_dir), "--out", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def scripted_validation(monkeypatch, scores, test_accuracies=None, first_epoch=1):
    """Make engine.evaluate report scores[i] as (loss, accuracy) on the validation images of epoch
    first_epoch + i (and test_accuracies[i] on the test images, if given); returns {epoch: the
    weights validated}, filled in as the run goes."""
    weights, scores, tests = {}, iter(scores), iter(test_accuracies or [])

    def evaluate(model, loss_fn, x, y, *args, **kwargs):
        loss, accuracy = REAL_EVALUATE(model, loss_fn, x, y, *args, **kwargs)
        if len(y) == VAL_IMAGES:
            weights[first_epoch + len(weights)] = copy.deepcopy(model.state_dict())
            return next(scores)
        return loss, next(tests) if test_accuracies else accuracy

    monkeypatch.setattr(engine, "evaluate", evaluate)
    return weights


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_val_split_reports_validation_and_keeps_best_pt(val_run, mnist_dir, tmp_path, capsys):
    out, metrics = val_run
    assert metrics["config"]["val_split"] == 0.25
    for epoch in metrics["epochs"]:
        assert set(epoch) == EPOCH_KEYS | {"val_loss", "val_accuracy"}
        assert 0 <= epoch["val_accuracy"] <= 1 and epoch["val_loss"] > 0
    best = metrics["best"]
    assert best in metrics["epochs"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    saved = torch.load(out / "best.pt", weights_only=True)
    assert saved["epoch"] == best["epoch"] and saved["config"] == metrics["config"]
    assert saved["epochs"] == metrics["epochs"][:best["epoch"]]
    # The weights in best.pt give the reported validation numbers on the images data.hold_out picks.
    model = LeNet5()
    model.load_state_dict(saved["model"])
    held = data.hold_out(data.load("mnist", mnist_dir).train.first(512), VAL_IMAGES, seed=0)[1]
    loss, accuracy = engine.evaluate(model, torch.nn.functional.cross_entropy,
                                    *data.to_device(held, "cpu", *data.NORMALIZATION["mnist"]))
    assert accuracy == pytest.approx(best["val_accuracy"], abs=1.01 / VAL_IMAGES)  # at most one image flips
    assert loss == pytest.approx(best["val_loss"], rel=1e-4)
    # fastlenet.evaluate takes best.pt as it takes checkpoint.pt
    capsys.readouterr()
    assert evaluate.main([str(out / "best.pt"), "--data-dir", str(mnist_dir), "--limit-test", str(TEST_IMAGES),
                          "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["epoch"] == best["epoch"]
    assert report["test_accuracy"] == pytest.approx(best["test_accuracy"], abs=1.01 / TEST_IMAGES)


def test_val_split_trains_on_the_rest_and_validates_on_the_held_out_images(mnist_dir, tmp_path, capsys,
                                                                             monkeypatch):
    seen = {"train": [], "evaluate": []}

    def train_epoch(steps, scheduler, x, y, **kwargs):
        seen["train"].append(x)
        return 1.0, 0.5, 1.0

    def evaluate_(model, loss_fn, x, y, *args, **kwargs):
        seen["evaluate"].append(x)
        return 1.0, 0.5

    monkeypatch.setattr(engine, "train_epoch", train_epoch)
    monkeypatch.setattr(engine, "evaluate", evaluate_)
    status, stdout, _ = run_train(capsys, *VAL, "--seed", 3, "--epochs", 1, "--no-plot", "--data-dir", mnist_dir,
                                  "--out", tmp_path)
    assert status == 0
    assert f"train {TRAIN_IMAGES} / validation {VAL_IMAGES} / test {TEST_IMAGES} images" in stdout
    assert "val loss 1.0000 acc  50.00%" in stdout
    ds = data.load("mnist", mnist_dir)
    rest, held = data.hold_out(ds.train.first(512), VAL_IMAGES, seed=3)  # the split follows --seed
    (trained,), (validated, tested) = seen["train"], seen["evaluate"]  # validation first, then test
    def normalized(split):
        return data.to_device(split, "cpu", *data.NORMALIZATION["mnist"])[0]
    assert torch.equal(trained, normalized(rest))
    assert torch.equal(validated, normalized(held))
    assert torch.equal(tested, normalized(ds.test.first(TEST_IMAGES)))


@pytest.mark.parametrize("scores, best_epoch", [
    ([(0.5, 0.6), (0.9, 0.9), (0.2, 0.8)], 2),  # the highest accuracy, though not the lowest loss or the last
    ([(0.9, 0.5), (0.6, 0.8), (0.4, 0.8)], 3),  # equal accuracy: the lower loss
    ([(0.5, 0.8), (0.5, 0.8), (0.4, 0.7)], 1),  # equal accuracy and loss: the earlier epoch
], ids=["accuracy", "tie-loss", "tie-earlier"])
def test_best_pt_holds_the_epoch_with_the_best_validation_accuracy(scores, best_epoch, mnist_dir, tmp_path,
                                                                   capsys, monkeypatch):
    # The test accuracy peaks at another epoch: the choice must not look at it.
    test_accuracies = [0.99 if e == best_epoch % 3 + 1 else 0.1 for e in (1, 2, 3)]
    weights = scripted_validation(monkeypatch, scores, test_accuracies)
    status, stdout, _ = run_train(capsys, *VAL, "--epochs", 3, "--no-plot", "--data-dir", mnist_dir,
                                  "--out", tmp_path)
    assert status == 0
    assert not same_weights(weights[1], weights[3])  # the epochs' weights do differ
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert saved["epoch"] == best_epoch and same_weights(saved["model"], weights[best_epoch])
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["best"]["epoch"] == best_epoch and same_weights(checkpoint["best"]["model"], weights[best_epoch])
    assert same_weights(checkpoint["model"], weights[3])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["best"]["epoch"] == best_epoch and saved["epochs"] == metrics["epochs"][:best_epoch]
    assert (metrics["best"]["val_loss"], metrics["best"]["val_accuracy"]) == scores[best_epoch - 1]
    assert f"best.pt: epoch {best_epoch}, validation accuracy {scores[best_epoch - 1][1]:.2%}" in stdout


def test_resume_keeps_the_best_epoch(mnist_dir, tmp_path, capsys, monkeypatch):
    first = scripted_validation(monkeypatch, [(0.9, 0.6), (0.5, 0.9)])
    assert run_train(capsys, *VAL, "--epochs", 2, "--no-plot", "--data-dir", mnist_dir, "--out", tmp_path / "a")[0] == 0
    best_a = (tmp_path / "a" / "best.pt").read_bytes()
    # Two more epochs, both worse, into another directory: best.pt there is epoch 2's, from the checkpoint.
    scripted_validation(monkeypatch, [(0.4, 0.8), (0.3, 0.85)], first_epoch=3)
    assert run_train(capsys, "--resume", tmp_path / "a" / "checkpoint.pt", "--epochs", 4, "--no-plot",
                     "--data-dir", mnist_dir, "--out", tmp_path / "b")[0] == 0
    for path in (tmp_path / "b" / "best.pt", tmp_path / "a" / "best.pt"):
        saved = torch.load(path, weights_only=True)
        assert saved["epoch"] == 2 and same_weights(saved["model"], first[2])
    assert (tmp_path / "a" / "best.pt").read_bytes() == best_a  # the resumed run wrote only into b
    checkpoint = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 4 and checkpoint["best"]["epoch"] == 2
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["best"] == metrics["epochs"][1] and metrics["best"]["val_accuracy"] == 0.9
    # A later epoch that does better takes its place.
    later = scripted_validation(monkeypatch, [(0.2, 0.95)], first_epoch=5)
    assert run_train(capsys, "--resume", tmp_path / "b" / "checkpoint.pt", "--epochs", 5, "--no-plot",
                     "--data-dir", mnist_dir)[0] == 0
    saved = torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    assert saved["epoch"] == 5 and same_weights(saved["model"], later[5])


def test_val_split_resume_matches_an_uninterrupted_run(mnist_dir, tmp_path, capsys):
    """The same images are held out after --resume: 2 epochs + 1 == 3 straight, validation included."""
    common = VAL + ["--schedule", "none", "--no-plot", "--data-dir", mnist_dir]
    assert run_train(capsys, *common, "--epochs", 3, "--out", tmp_path / "straight")[0] == 0
    assert run_train(capsys, *common, "--epochs", 2, "--out", tmp_path / "split")[0] == 0
    assert run_train(capsys, "--resume", tmp_path / "split" / "checkpoint.pt", "--epochs", 3, "--no-plot",
                     "--data-dir", mnist_dir)[0] == 0
    straight, split = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "split"))
    for key in ("val_loss", "val_accuracy", "test_loss", "test_accuracy"):
        assert split["epochs"][-1][key] == pytest.approx(straight["epochs"][-1][key], rel=1e-5), key
    assert split["best"]["epoch"] == straight["best"]["epoch"]


@pytest.mark.parametrize("value", ["0", "1", "-0.1", "1.5", "nan"])
def test_val_split_outside_0_and_1(value, tmp_path, capsys):
    status, _, err = run_train(capsys, "--val-split", value, "--out", tmp_path)
    assert_one_line_error(status, err, "--val-split", "between 0 and 1")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value, fragment", [("0.01", "holds out no image"), ("0.99", "leaving none to train on")])
def test_val_split_that_leaves_a_part_empty(value, fragment, mnist_dir, tmp_path, capsys):
    status, _, err = run_train(capsys, "--limit-train", 10, "--val-split", value, "--data-dir", mnist_dir,
                               "--out", tmp_path)
    assert_one_line_error(status, err, fragment, "10 training images", "--limit-train 10")
    assert not (tmp_path / "metrics.json").exists()


def test_resume_with_another_val_split(val_run, mnist_dir, tmp_path, capsys):
    status, _, err = run_train(capsys, "--resume", val_run[0] / "checkpoint.pt", "--val-split", 0.5, "--epochs", 3,
                               "--data-dir", mnist_dir, "--out", tmp_path)
    assert_one_line_error(status, err, "trained with --val-split 0.25, not 0.5")


def test_checkpoint_from_before_val_split_resumes_without_one(smoke, mnist_dir, tmp_path, capsys):
    checkpoint = torch.load(smoke[0] / "checkpoint.pt", weights_only=True)
    del checkpoint["config"]["val_split"], checkpoint["best"]  # as fastlenet wrote them before --val-split
    torch.save(checkpoint, tmp_path / "old.pt")
    status, _, err = run_train(capsys, "--resume", tmp_path / "old.pt", "--val-split", 0.25, "--epochs", 3,
                               "--data-dir", mnist_dir, "--out", tmp_path / "run")
    assert_one_line_error(status, err, "trained with --val-split None, not 0.25")
    assert run_train(capsys, "--resume", tmp_path / "old.pt", "--epochs", 3, "--no-plot", "--data-dir", mnist_dir,
                     "--out", tmp_path / "run")[0] == 0
    assert not (tmp_path / "run" / "best.pt").exists()


def test_resume_from_best_pt_points_to_checkpoint_pt(val_run, mnist_dir, tmp_path, capsys):
    status, _, err = run_train(capsys, "--resume", val_run[0] / "best.pt", "--epochs", 3, "--data-dir", mnist_dir,
                               "--out", tmp_path)
    assert_one_line_error(status, err, "only weights", "resume from the run's checkpoint.pt")


BAD_BEST = {
    "no best entry": (lambda c: c.pop("best"), "its best entry"),
    "weights are a list": (lambda c: c["best"].update(model=[1, 2]), "its best entry"),
    "epoch not run": (lambda c: c["best"].update(epoch=7), "best epoch 7 has no validation"),
    "no validation record": (lambda c: c["epochs"][c["best"]["epoch"] - 1].pop("val_loss"), "has no validation"),
    "wrong shapes": (lambda c: c["best"]["model"].update({"fc3.bias": torch.zeros(3)}), "fc3.bias is 3"),
}


@pytest.mark.parametrize("case", BAD_BEST)
def test_bad_best_record_is_one_line_of_ours(case, val_run, mnist_dir, tmp_path, capsys):
    edit, fragment = BAD_BEST[case]
    _edited(edit)(val_run[0] / "checkpoint.pt", tmp_path / "checkpoint.pt")
    status, _, err = run_train(capsys, "--resume", tmp_path / "checkpoint.pt", "--epochs", 3, "--data-dir", mnist_dir,
                               "--out", tmp_path / "run")
    assert_one_line_error(status, err, fragment, str(tmp_path / "checkpoint.pt"))
    assert not (tmp_path / "run" / "best.pt").exists()


# --------------------------------------------------------------------------------------------------
# What a user sees first: --help, and the README
# --------------------------------------------------------------------------------------------------

def test_names_are_the_library_names():
    """fastlenet.names, which the parsers read without PyTorch, names what models and data hold."""
    assert tuple(VARIANTS) == names.LENET5_NAMES and tuple(NETWORKS) == names.NETWORK_NAMES
    assert MODEL_NAMES == names.MODEL_NAMES == (*VARIANTS, *NETWORKS) and MODEL_NAMES[:3] == tuple(sorted(VARIANTS))
    assert data.DATASETS == names.DATASET_NAMES
    assert tuple(data.CLASS_NAMES) == data.DATASETS and all(len(names) == 10 for names in data.CLASS_NAMES.values())


@pytest.mark.parametrize("command", [["fastlenet.train", "--help"], ["fastlenet.evaluate", "--help"],
                                     ["fastlenet.train", "--epochs", "0"]])
def test_help_and_bad_flags_answer_without_importing_torch(command):
    """PyTorch takes seconds to import on a busy machine; --help and a bad flag need none of it.
    -X importtime lists every module the process imports, on stderr."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", *command], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == (0 if command[-1] == "--help" else 2), proc.stderr[-2000:]
    assert "usage: python -m fastlenet." in proc.stdout + proc.stderr
    imported = re.findall(r"^import time:.*\|\s*([\w.]+)\s*$", proc.stderr, re.M)
    assert "argparse" in imported  # the listing works
    assert not [m for m in imported if m.split(".")[0] in ("torch", "numpy", "triton")], command


PROCESS_WORDS = re.compile(r"\bissue\s*#?\d|\bthe issue\b|\bseed[-_ ]style|\bseeds'|\bseed's|\bseed script", re.I)


def test_user_facing_text_has_no_process_words():
    """The README, --help and the shipped code speak of what a user can know: no issue numbers or
    names for scripts that only the project's history explains."""
    files = [REPO / "README.md", *sorted(REPO.glob("docs/*.md")), REPO / "bench" / "README.md",
             *sorted(REPO.glob("fastlenet/*.py")), *sorted(REPO.glob("kernels/*.py")),
             *sorted(REPO.glob("bench/*.py"))]
    hits = [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for path in files
            for n, line in enumerate(path.read_text().splitlines(), 1) if PROCESS_WORDS.search(line)]
    helps = [module.build_parser().format_help() for module in (train, evaluate, predict)]
    hits += [line for text in helps for line in text.splitlines() if PROCESS_WORDS.search(line)]
    assert not hits, "\n".join(hits)
    assert not (REPO / "bench" / "seed_style_mnist.py").exists()


def readme_section(title: str, doc: str = "docs/cli.md") -> str:
    """The `## title` section of a user document (the command line's is docs/cli.md, which the
    README links to)."""
    text = (REPO / doc).read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_says_how_to_get_fashion_mnist():
    section = readme_section("Data")
    for needed in ("torchvision", "apt-get install dataset-fashion-mnist", "--data-dir", "pip alone cannot",
                   "FashionMNIST/raw", *data.FILES):
        assert needed in section, needed


def test_readme_says_what_repeats_a_run():
    (seed_row,) = [line for line in readme_section("Training CLI").splitlines() if line.startswith("| `--seed")]
    assert "same device" in seed_row and "--threads" in seed_row


@pytest.mark.parametrize("module", [train, evaluate, predict], ids=lambda m: m.__name__)
def test_readme_documents_every_flag(module):
    """Each tool's flags in its own section of docs/cli.md, the page the README sends users to."""
    assert "(docs/cli.md)" in (REPO / "README.md").read_text()
    titles = {train: "Training CLI", evaluate: "Evaluating a checkpoint", predict: "Classifying your own images"}
    section = readme_section(titles[module])
    flags = [o for action in module.build_parser()._actions for o in action.option_strings if o.startswith("--")]
    missing = [flag for flag in flags if flag != "--help" and f"`{flag}" not in section]
    assert not missing, missing
