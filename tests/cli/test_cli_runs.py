"""What a run leaves in its --out directory and what the tools show about it: an --out that holds a
run is refused unless --resume continues it or --overwrite replaces it; fastlenet.evaluate reads the
data the run trained from; the help of fastlenet.train; what curves.png and misclassified.png say.
Tiny runs (64 training images, one or two epochs) on real MNIST, on the CPU, reference path.
"""
import json
import os
import shlex
import shutil

import pytest
import torch
from matplotlib.text import Text

from fastlenet import checkpoint, data, evaluate, names, plots, predict, train
from fastlenet.models import NETWORKS, VARIANTS

from utils import assert_one_line_error, run_cli

TINY = ["--limit-train", "64", "--limit-test", "64", "--batch-size", "32"]


def epoch_of(path) -> int:
    return torch.load(path, weights_only=True)["epoch"]


@pytest.fixture
def figures(monkeypatch):
    """{file name: matplotlib Figure} of every figure the tools save, which are still written."""
    saved, real = {}, plots.save_figure

    def save_figure(path, figure):
        saved[path.name] = figure
        real(path, figure)

    monkeypatch.setattr(plots, "save_figure", save_figure)
    return saved


def texts(figure) -> list[str]:
    return [t.get_text() for t in figure.findobj(Text) if t.get_text()]


# --------------------------------------------------------------------------------------------------
# --out that holds a run: refused, unless --resume continues it or --overwrite replaces it
# --------------------------------------------------------------------------------------------------

def test_out_holding_a_run_is_refused_and_overwrite_replaces_only_its_files(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = [*TINY, "--data-dir", mnist_dir, "--out", out]
    assert run_cli(capsys, train.main, *common, "--epochs", 2, "--val-split", 0.25)[0] == 0
    assert run_cli(capsys, evaluate.main, out / "checkpoint.pt", "--data-dir", mnist_dir, "--limit-test", 16)[0] == 0
    # Every file that train and evaluate write is one that --overwrite knows to remove.
    assert sorted(p.name for p in out.iterdir()) == sorted(checkpoint.RUN_FILES)
    (out / "notes.txt").write_text("the user's own file")
    (out / ".metrics.json.x1y2.tmp").write_text("left by an interrupted write")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    status, _, err = run_cli(capsys, train.main, *common, "--epochs", 1)
    assert_one_line_error(status, err, f"--out {out} already holds a run", "checkpoint.pt", "evaluation.json",
                          f"--resume {out / 'checkpoint.pt'}", "--overwrite", "another --out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    status, stdout, _ = run_cli(capsys, train.main, *common, "--epochs", 1, "--no-plot", "--overwrite")
    assert status == 0 and "--overwrite: removed" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json", "notes.txt"]
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert epoch_of(out / "checkpoint.pt") == 1
    assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1]


@pytest.mark.parametrize("name", checkpoint.RUN_FILES)
def test_any_run_file_makes_out_a_run(name, mnist_dir, tmp_path, capsys):
    (tmp_path / name).write_bytes(b"from an earlier run")
    status, _, err = run_cli(capsys, train.main, *TINY, "--epochs", 1, "--data-dir", mnist_dir, "--out", tmp_path)
    assert_one_line_error(status, err, "already holds a run", name, "--overwrite")
    assert ("--resume" in err) == (name == "checkpoint.pt")  # only a checkpoint can be continued
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_out_without_run_files_is_used(mnist_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "checkpoint.pt.bak").write_text("not a name a run writes")
    for out in (tmp_path / "empty", tmp_path / "other"):
        assert run_cli(capsys, train.main, *TINY, "--epochs", 1, "--no-plot", "--data-dir", mnist_dir,
                       "--out", out)[0] == 0
        assert epoch_of(out / "checkpoint.pt") == 1
    assert (tmp_path / "other" / "checkpoint.pt.bak").exists()


def test_resume_continues_in_its_own_directory_and_refuses_another_run(mnist_dir, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*TINY, "--no-plot", "--data-dir", mnist_dir]
    assert run_cli(capsys, train.main, *common, "--epochs", 1, "--out", a)[0] == 0
    assert run_cli(capsys, train.main, *common, "--epochs", 1, "--out", b)[0] == 0
    # --out spelled differently from the checkpoint's directory is still that directory.
    assert run_cli(capsys, train.main, "--resume", a / ".." / "a" / "checkpoint.pt", "--epochs", 2, "--out", a,
               *common)[0] == 0
    assert epoch_of(a / "checkpoint.pt") == 2
    status, _, err = run_cli(capsys, train.main, "--resume", a / "checkpoint.pt", "--epochs", 3, "--out", a,
                         "--overwrite", *common)
    assert_one_line_error(status, err, "--overwrite with --resume", "the checkpoint's own directory")
    # Resuming a into b, which holds a run of its own: refused, as for a new run, then replaced.
    status, _, err = run_cli(capsys, train.main, "--resume", a / "checkpoint.pt", "--epochs", 3, "--out", b, *common)
    assert_one_line_error(status, err, f"--out {b} already holds a run", "--overwrite")
    assert "--resume" not in err and epoch_of(a / "checkpoint.pt") == 2 and epoch_of(b / "checkpoint.pt") == 1
    assert run_cli(capsys, train.main, "--resume", a / "checkpoint.pt", "--epochs", 3, "--out", b, "--overwrite",
               *common)[0] == 0
    assert epoch_of(b / "checkpoint.pt") == 3 and epoch_of(a / "checkpoint.pt") == 2


# --------------------------------------------------------------------------------------------------
# fastlenet.evaluate reads the data directory the run trained from
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def trained(mnist_dir, tmp_path_factory):
    """A one-epoch run trained from mnist_dir: its checkpoint."""
    out = tmp_path_factory.mktemp("trained")
    assert train.main([*TINY, "--epochs", "1", "--no-plot", "--data-dir", str(mnist_dir), "--out", str(out)]) == 0
    return out / "checkpoint.pt"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory without data, in a process that cannot fetch any."""
    def no_fetching(*args):
        raise AssertionError("fetched MNIST although the run's data directory holds it")

    monkeypatch.setattr(data, "_fetch", no_fetching)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def edited(checkpoint, path, **config):
    saved = torch.load(checkpoint, weights_only=True)
    saved.pop("data_dir", None)  # as checkpoints from before it was recorded
    saved["config"].update(config)
    torch.save(saved, path)
    return path


def test_evaluate_reads_the_data_dir_the_run_used(trained, mnist_dir, elsewhere, tmp_path, capsys):
    raw = mnist_dir / "MNIST" / "raw"
    status, stdout, _ = run_cli(capsys, evaluate.main, trained, "--limit-test", 16, "--out", tmp_path / "eval")
    assert status == 0 and f"verified files in {raw}" in stdout
    assert not (elsewhere / "data").exists()
    # A checkpoint that records only the flag as given, relative to where the run started.
    old = edited(trained, tmp_path / "old.pt", data_dir=os.path.relpath(mnist_dir, elsewhere))
    assert run_cli(capsys, evaluate.main, old, "--limit-test", 16, "--out", tmp_path / "eval")[0] == 0
    assert not (elsewhere / "data").exists()


def test_evaluate_falls_back_to_data_when_the_run_data_dir_is_gone(trained, mnist_dir, elsewhere, tmp_path, capsys):
    raw = elsewhere / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in data.SPLITS["test"]:
        shutil.copyfile(mnist_dir / "MNIST" / "raw" / f, raw / f)
    gone = edited(trained, tmp_path / "gone.pt", data_dir=str(tmp_path / "moved"))
    status, stdout, _ = run_cli(capsys, evaluate.main, gone, "--limit-test", 16, "--out", tmp_path / "eval")
    assert status == 0
    (said,) = [line for line in stdout.splitlines() if "no longer holds" in line]
    assert str(tmp_path / "moved") in said and "using ./data" in said
    assert "verified files in data/MNIST/raw" in stdout
    # An explicit --data-dir wins over the run's, and is not remarked on.
    status, stdout, _ = run_cli(capsys, evaluate.main, trained, "--data-dir", "data", "--limit-test", 16,
                            "--out", tmp_path / "eval")
    assert status == 0 and "verified files in data/MNIST/raw" in stdout and "no longer holds" not in stdout


# --------------------------------------------------------------------------------------------------
# train --help
# --------------------------------------------------------------------------------------------------

def test_train_help_names_every_network_once_and_shows_examples(capsys):
    status, text, _ = run_cli(capsys, train.main, "--help")
    assert status == 0
    assert "{lenet5" not in text  # no choice list in braces, in the usage or beside the flag
    prose = " ".join(text.split())  # as wrapped for the terminal
    for group in (VARIANTS, names.PAPER_NAMES, names.TUTORIAL_NAMES):
        assert prose.count(", ".join(group)) == 1, group
    assert [*VARIANTS, *NETWORKS] == list(names.MODEL_NAMES)
    assert "--model NAME" in text
    examples = text[text.index("\nexamples:\n"):]
    commands = [shlex.split(line) for line in examples.splitlines() if line.startswith("  python -m")]
    tools = {"fastlenet.train": train, "fastlenet.evaluate": evaluate, "fastlenet.predict": predict}
    assert [c[2] for c in commands].count("fastlenet.train") >= 2
    assert {"fastlenet.evaluate", "fastlenet.predict"} <= {c[2] for c in commands}
    for command in commands:  # each one is a command its tool takes
        tools[command[2]].build_parser().parse_args(command[3:])


# --------------------------------------------------------------------------------------------------
# curves.png and misclassified.png
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("epochs, ticks", [(1, [1]), (3, [1, 2, 3]), (25, [5, 10, 15, 20, 25])])
def test_curves_have_whole_epoch_ticks_and_say_the_training_figures_are_running_means(
        epochs, ticks, tmp_path, figures):
    history = [{"epoch": e, "train_loss": 1 / e, "train_accuracy": 0.5, "test_loss": 1 / e, "test_accuracy": 0.6}
               for e in range(1, epochs + 1)]
    plots.plot_curves(history, tmp_path / "curves.png")
    figure = figures["curves.png"]
    for ax in figure.axes:
        assert list(ax.get_xticks()) == ticks
        assert [label.get_text() for label in ax.get_xticklabels()] == [str(t) for t in ticks]
        labels = ax.get_legend_handles_labels()[1]
        assert any(label.startswith("train") and "running mean" in label for label in labels), labels


def test_misclassified_png_says_how_many_of_how_many_and_which(trained, mnist_dir, tmp_path, capsys, figures):
    # A model after one epoch on 64 images gets most of 2,000 test images wrong: over 1,000.
    assert run_cli(capsys, evaluate.main, trained, "--data-dir", mnist_dir, "--limit-test", 2000, "--max-images", 5,
               "--out", tmp_path)[0] == 0
    wrong = json.loads((tmp_path / "evaluation.json").read_text())["misclassified"]
    assert len(wrong) >= 1000
    shown = texts(figures["misclassified.png"])
    assert f"misclassified test images: 5 of {len(wrong):,} shown" in shown
    tiles = [t for t in shown if t.startswith("#")]
    assert tiles == [f"#{w['index']}: pred {w['predicted']}\ntrue {w['true']}" for w in wrong[:5]]
