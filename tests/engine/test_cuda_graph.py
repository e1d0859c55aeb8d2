"""The CUDA-graph training path, everything but the capture, on the CPU.

`python -m fastlenet.train` runs each step through engine.StepRunner, which on CUDA captures
engine.training_step in a CUDA graph (engine.capture) at the first full batch and replays it.
Here engine.capture is replaced by a stand-in that runs the warm-up call and returns the step
itself as the "replay": the same step function, static buffers, in-place running sums and
learning-rate tensors as on a GPU, run eagerly. It must give the same numbers, bit for bit, as the
plain loop the CLI used before (written out below as the oracle).
"""
import argparse
import json
import math

import pytest
import torch

from fastlenet import data, engine, train
from fastlenet.models import LeNet5


class FakeCapture:
    """engine.capture without CUDA: the warm-up calls run, the "replay" is the step itself."""

    def __init__(self):
        self.captured, self.replays = 0, 0

    def __call__(self, step, warmup=3):
        for _ in range(warmup):
            step()
        self.captured += 1

        def replay():
            self.replays += 1
            step()
        return replay


def _args(optimizer="adam", schedule="onecycle"):
    return argparse.Namespace(optimizer=optimizer, lr=3e-3, momentum=0.9, weight_decay=1e-4, schedule=schedule)


def _setup(fused, args, total, graph):
    torch.manual_seed(1)
    model = LeNet5("lenet5", fused=fused)
    optimizer = engine.build_optimizer(model, args, capturable=graph)
    scheduler = engine.build_scheduler(optimizer, args.schedule, total, 0, None, cycle_momentum=not graph)
    if graph:
        engine.lr_as_tensors(optimizer, torch.device("cpu"))
    return model, optimizer, scheduler


def old_loop(model, optimizer, scheduler, loss_fn, x, y, batch_size, generator):
    """The CLI's loop before StepRunner: the oracle."""
    loss_sum, correct, losses = torch.zeros(()), torch.zeros((), dtype=torch.int64), []
    for xb, yb in data.batches(x, y, batch_size, generator=generator):
        logits = model(xb)
        loss = loss_fn(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        with torch.no_grad():
            loss_sum.add_(loss.detach(), alpha=len(yb))
            correct.add_((logits.argmax(1) == yb).sum())
        losses.append(loss.item())
    return loss_sum.item() / len(x), correct.item() / len(x)


def compare(monkeypatch, *, fused, n, batch_size, epochs=2, optimizer="adam", schedule="onecycle", graph=True):
    """Train (n random images) both ways for `epochs`; assert identical metrics, weights, lr."""
    fake = FakeCapture()
    monkeypatch.setattr(engine, "capture", fake)
    x = torch.randn(n, 1, 28, 28)
    y = torch.randint(0, 10, (n,))
    loss_fn = engine.loss_function(fused)
    args = _args(optimizer, schedule)
    total = epochs * math.ceil(n / batch_size)
    ref = _setup(fused, args, total, graph)  # the graph run's settings (lr tensors, fixed momentum)
    new = _setup(fused, args, total, graph)
    ref_gen, new_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    steps = engine.StepRunner(new[0], new[1], loss_fn, x, y, batch_size, graph=graph)
    for _ in range(epochs):
        expected = old_loop(*ref[:2], ref[2], loss_fn, x, y, batch_size, ref_gen)
        got = engine.train_epoch(steps, new[2], x, y, generator=new_gen)[:2]
        assert got == expected
    for (name, a), b in zip(ref[0].state_dict().items(), new[0].state_dict().values()):
        assert torch.equal(a, b), name
    assert float(ref[1].param_groups[0]["lr"]) == float(new[1].param_groups[0]["lr"])
    return fake, steps


@pytest.mark.parametrize("optimizer,schedule", [("adam", "onecycle"), ("sgd", "cosine")])
def test_graph_step_equals_the_old_loop_reference(monkeypatch, optimizer, schedule):
    """20 images, batch 8: two full batches (the first captured, the second replayed) and a partial
    one (eager) per epoch; two epochs, so the running sums are reset in place between them."""
    fake, steps = compare(monkeypatch, fused=False, n=20, batch_size=8, optimizer=optimizer, schedule=schedule)
    assert fake.captured == 1 and fake.replays == 3  # epoch 1: capture + 1 replay; epoch 2: 2 replays
    assert steps.replay is not None


def test_without_a_graph_the_loop_is_unchanged(monkeypatch):
    """graph=False: the onecycle schedule cycles momentum as before, nothing is captured."""
    fake, _ = compare(monkeypatch, fused=False, n=20, batch_size=8, graph=False)
    assert fake.captured == 0


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="runs the fused model on the CPU, through the interpreter (no CUDA only); on "
                           "CUDA the real capture is checked by training with and without the graph")
def test_graph_step_equals_the_old_loop_fused(monkeypatch):
    """The fused model through Triton's interpreter on the CPU: 5 images, batch 2, one epoch."""
    fake, _ = compare(monkeypatch, fused=True, n=5, batch_size=2, epochs=1)
    assert fake.captured == 1 and fake.replays == 1


def test_only_a_partial_batch(monkeypatch):
    """Fewer images than the batch: the buffers are that long, the batch fills them: captured."""
    fake, _ = compare(monkeypatch, fused=False, n=6, batch_size=8, epochs=2)
    assert fake.captured == 1 and fake.replays == 1


def test_a_failed_capture_is_one_line_and_training_goes_on(monkeypatch, capsys):
    def broken(step, warmup=3):
        for _ in range(warmup):
            step()
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    n, batch_size = 20, 8
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    args = _args()
    ref = _setup(False, args, 3, True)
    new = _setup(False, args, 3, True)
    monkeypatch.setattr(engine, "capture", broken)
    steps = engine.StepRunner(new[0], new[1], torch.nn.functional.cross_entropy, x, y, batch_size, graph=True)
    got = engine.train_epoch(steps, new[2], x, y, generator=torch.Generator().manual_seed(5))[:2]
    expected = old_loop(*ref, torch.nn.functional.cross_entropy, x, y, batch_size, torch.Generator().manual_seed(5))
    assert got == expected
    err = capsys.readouterr().err.splitlines()
    assert err == ["cuda graph: capture failed (operation not permitted when stream is capturing more); "
                   "training without it"]


def test_cli_graph_path_gives_the_same_metrics(mnist_dir, tmp_path, monkeypatch, capsys):
    """The whole CLI with the graph path forced on the CPU (capture faked) gives the metrics of a run
    without it; its checkpoint holds plain numbers and resumes without the graph."""
    common = ["--limit-train", "100", "--limit-test", "100", "--batch-size", "32", "--epochs", "1",
              "--schedule", "cosine", "--no-plot", "--data-dir", str(mnist_dir)]
    assert train.main([*common, "--out", str(tmp_path / "plain")]) == 0
    fake = FakeCapture()
    monkeypatch.setattr(engine, "capture", fake)
    monkeypatch.setattr(engine, "use_cuda_graph", lambda *a: True)
    assert train.main([*common, "--out", str(tmp_path / "graph")]) == 0
    assert fake.captured == 1 and fake.replays == 2  # 100 = 32 captured + 2 x 32 replayed + 4 eager
    assert "cuda graph: each full training step is one graph replay" in capsys.readouterr().out

    def metrics(name):
        epochs = json.loads((tmp_path / name / "metrics.json").read_text())["epochs"]
        return [{k: v for k, v in e.items() if k not in ("seconds", "images_per_second")} for e in epochs]

    assert metrics("graph") == metrics("plain")
    checkpoint = torch.load(tmp_path / "graph" / "checkpoint.pt", weights_only=True)
    assert type(checkpoint["optimizer"]["param_groups"][0]["lr"]) is float
    monkeypatch.undo()
    assert train.main([*common, "--epochs", "2", "--resume", str(tmp_path / "graph" / "checkpoint.pt")]) == 0


@pytest.mark.parametrize("flags,fragment", [
    (["--cuda-graph", "on", "--device", "cpu"], "--cuda-graph on: CUDA graphs need a CUDA device"),
    (["--compile", "--fused"], "--compile compiles the reference model"),
])
def test_flag_errors_are_one_line(flags, fragment, tmp_path, capsys, monkeypatch):
    from fastlenet.kernels import launch

    monkeypatch.setattr(launch, "interpreting", lambda: True)  # --fused passes its own check
    assert train.main([*flags, "--limit-train", "8", "--data-dir", str(tmp_path / "d"),
                       "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_graph_auto_and_off():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engine.use_cuda_graph("auto", True, cuda) and not engine.use_cuda_graph("auto", False, cuda)
    assert not engine.use_cuda_graph("auto", True, cpu) and not engine.use_cuda_graph("off", True, cuda)
    assert engine.use_cuda_graph("on", False, cuda)
    assert train.build_parser().parse_args(["--no-cuda-graph"]).cuda_graph == "off"


def test_compile_on_the_cpu(mnist_dir, tmp_path):
    """--compile: the reference model through torch.compile trains and writes a plain state_dict."""
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available")
    try:
        torch.compile(lambda t: t + 1)(torch.ones(2))
    except Exception as e:  # noqa: BLE001 - no C compiler for inductor, and the like: all mean skip
        pytest.skip(f"torch.compile does not work here: {e}")
    assert train.main(["--compile", "--device", "cpu", "--limit-train", "64", "--limit-test", "64",
                       "--batch-size", "32", "--epochs", "1", "--no-plot", "--data-dir", str(mnist_dir),
                       "--out", str(tmp_path)]) == 0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert set(state) == set(LeNet5("lenet5").state_dict())
