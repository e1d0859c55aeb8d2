"""python -m fastlenet.train under torchrun, on the CPU (gloo on localhost): the weights of two
processes against one, the fused path through the interpreter, resuming across numbers of processes,
rank 0 alone printing and writing, and a killed rank ending the run with one line.

Two runs that differ only in the number of processes compute the same global batches' mean gradients,
summed in another order (each rank's mean over its share, then DDP's mean over ranks): float32
rounding, about 1e-7 relative per step. Training amplifies such differences (Adam normalises each
update, so a weight whose gradient is near zero moves by up to its learning rate either way on a
rounding's sign), so the bound is not rounding times steps: over 300 steps we measured 3e-6 to 1.5e-4
and allow 1e-3, a two-hundredth of what a wrong gradient moves the weights (each rank's mean without
its share's scale, at batch 63: 0.2) or another seed (0.5).
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from utils import REPO, env_without_interpreter

WEIGHTS_TOLERANCE = 1e-3
pytestmark = pytest.mark.slow


def train(tmp_path, mnist_dir, *args, processes: int = 1, interpret: bool = False, out="run", check=True):
    env = env_without_interpreter()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    command = [*launcher, "-m", "fastlenet.train", "--data-dir", str(mnist_dir), "--no-plot", "--threads", "1",
               *(["--out", str(tmp_path / out)] if out else []), *map(str, args)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def distance(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# A batch size two ranks share unequally (31 + 32; the epoch's last batch, 37, as 18 + 19): the
# gradient scale of the shares is needed to match one process.
STEPS = ["--limit-train", 6400, "--limit-test", 200, "--epochs", 3, "--batch-size", 63]


def test_two_processes_reach_the_weights_of_one(tmp_path, mnist_dir):
    one = train(tmp_path, mnist_dir, *STEPS, out="one")
    two = train(tmp_path, mnist_dir, *STEPS, processes=2, out="two")
    gap = distance(weights(tmp_path / "one/checkpoint.pt"), weights(tmp_path / "two/checkpoint.pt"))
    assert gap < WEIGHTS_TOLERANCE
    m1, m2 = (json.loads((tmp_path / f"{d}/metrics.json").read_text())["epochs"] for d in ("one", "two"))
    for a, b in zip(m1, m2, strict=True):  # the metrics are the global batch's and the whole test set's
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=1 / 200)
    # Rank 0 alone prints: each line once.
    epochs = [line for line in two.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"], two.stdout
    assert "2 processes (gloo), --batch-size global" in two.stdout
    assert one.stdout.count("final test accuracy") == two.stdout.count("final test accuracy") == 1


def test_rank_zero_alone_writes(tmp_path, mnist_dir):
    # Without --out each rank would pick its own fresh runs/<timestamp>: only rank 0's exists.
    train(tmp_path, mnist_dir, "--limit-train", 256, "--limit-test", 64, "--epochs", 1, "--batch-size", 64,
          processes=2, out=None)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    assert sorted(p.name for p in runs[0].iterdir()) == ["checkpoint.pt", "metrics.json"]


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_with_another_number_of_processes(tmp_path, mnist_dir, first, then):
    # No schedule: onecycle's steps depend on --epochs, which differs between the runs compared.
    common = ["--limit-train", 1280, "--limit-test", 100, "--batch-size", 64, "--schedule", "none"]
    train(tmp_path, mnist_dir, *common, "--epochs", 3, out="straight")
    train(tmp_path, mnist_dir, *common, "--epochs", 2, processes=first, out="split")
    train(tmp_path, mnist_dir, *common, "--epochs", 3, "--resume", tmp_path / "split/checkpoint.pt",
          processes=then, out="split")
    checkpoint = torch.load(tmp_path / "split/checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 3
    assert distance(weights(tmp_path / "straight/checkpoint.pt"), checkpoint["model"]) < WEIGHTS_TOLERANCE


def test_the_fused_path_matches_one_process_through_the_interpreter(tmp_path, mnist_dir):
    # A handful of images: two steps of 12, each rank 6 of them, Triton's interpreter on the CPU.
    tiny = ["--fused", "--limit-train", 24, "--limit-test", 8, "--epochs", 1, "--batch-size", 12,
            "--schedule", "none"]
    train(tmp_path, mnist_dir, *tiny, interpret=True, out="one")
    train(tmp_path, mnist_dir, *tiny, processes=2, interpret=True, out="two")
    # Two steps: the rounding of two summation orders, not yet amplified.
    assert distance(weights(tmp_path / "one/checkpoint.pt"), weights(tmp_path / "two/checkpoint.pt")) < 1e-5


def _workers(parent: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun (pid `parent`) started, from /proc."""
    out = {}
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = dict(e.split(b"=", 1) for e in (d / "environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if b"RANK" in env:
            out[int(env[b"RANK"])] = int(d.name)
    return out


@pytest.mark.skipif(not pathlib.Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_killed_rank_ends_the_run_with_one_line_and_the_checkpoint_intact(tmp_path, mnist_dir):
    env = {**env_without_interpreter(), "PYTHONPATH": str(REPO)}
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "fastlenet.train",
         "--data-dir", str(mnist_dir), "--no-plot", "--threads", "1", "--limit-train", "6400", "--limit-test", "100",
         "--epochs", "100", "--out", str(out), "--dist-timeout", "20"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.2)
        ranks = _workers(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        killed = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and time.monotonic() - killed < 60
    mine = [line for line in stderr.splitlines() if line.startswith("error: ")]
    # Which line rank 0 prints depends on which comes first: its own wait on the dead peer, or
    # torchrun stopping it once it has seen that peer fail. Both say what happened, in one line.
    assert len(mine) == 1 and mine[0].startswith(("error: rank 0: another process of the run died or stopped "
                                                  "answering", "error: rank 0: stopped by the launcher: another "
                                                  "process of the run failed")), stderr[-3000:]
    # No rank's traceback (torchrun's own report of the failed worker follows, as torchrun prints it).
    assert "holds the last finished epoch" in mine[0] and "[rank0]: Traceback" not in stderr
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)  # whole: written atomically
    assert checkpoint["epoch"] >= 1
