"""The two command-line tools, run in-process on small subsets of real MNIST, on the CPU.

A smoke run (512 training images, 2 epochs) is shared by the schema, checkpoint, resume and
evaluation tests; the error-path tests check the contract for user mistakes: exit status 2 and one
line `error: ...` on stderr, never a traceback.
"""
import json
import shutil

import pytest
import torch

from fastlenet import data, evaluate, train
from fastlenet.models import LeNet5

SMALL = ["--limit-train", "512", "--limit-test", "1000", "--batch-size", "128"]
EPOCH_KEYS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_second", "seconds"}


def run_train(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    status = train.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def smoke(mnist_dir, tmp_path_factory):
    """A finished 2-epoch run: (its --out directory, its metrics)."""
    out = tmp_path_factory.mktemp("smoke")
    status = train.main(SMALL + ["--epochs", "2", "--data-dir", str(mnist_dir), "--out", str(out)])
    assert status == 0
    return out, json.loads((out / "metrics.json").read_text())


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


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
    _, accuracy = train.evaluate(model, torch.nn.functional.cross_entropy, x, y)
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
                 "--out", "--resume", "--target-accuracy", "--augment", "--limit-test"):
        assert flag in out
    assert "(default: 128)" in out  # defaults are shown


def test_keyboard_interrupt_exits_130(mnist_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C in epoch 2: status 130, no traceback, and the way to resume epoch 1's checkpoint."""
    real_epoch, calls = train.train_epoch, []

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", interrupted_in_epoch_2)
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
    assert_one_line_error(status, err, "does not fit", "lenet5-nopad")


@pytest.mark.parametrize("content, fragment", [
    (b"definitely not a checkpoint", "cannot read checkpoint"),
    (None, "does not exist"),
    ("list", "not a fastlenet checkpoint"),
])
def test_bad_checkpoint_file(tmp_path, capsys, content, fragment):
    path = tmp_path / "checkpoint.pt"
    if content == "list":
        torch.save([1, 2, 3], path)
    elif content is not None:
        path.write_bytes(content)
    status, _, err = run_train(capsys, "--resume", path, "--out", tmp_path / "run")
    assert_one_line_error(status, err, fragment)
    assert_one_line_error(evaluate.main([str(path), "--out", str(tmp_path / "eval")]), capsys.readouterr().err,
                          fragment)


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
