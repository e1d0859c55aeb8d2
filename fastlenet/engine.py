"""The training engine: one training step, and what runs it (mixed precision, CUDA-graph capture,
the epoch loop), evaluation and prediction over a tensor, and the optimizer and schedules it steps.

training_step is the one step of the project: python -m fastlenet.train runs it (through StepRunner:
eagerly, or captured in a CUDA graph by capture()), and so do the benchmarks and the tests. Nothing
in it reads a value back to the host or depends on one, which is what lets a CUDA graph capture it;
the epoch loop waits for the device only for its progress bar, every POSTFIX_EVERY steps.

Layers: this module calls the models and fastlenet.data; the command-line tools, the benchmarks and
fastlenet.profiling call it. It knows no flags: its errors are ValueErrors, which the tools word.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from fastlenet import data, distributed
from fastlenet.names import EVAL_BATCH_SIZE

__all__ = ["training_step", "Amp", "capture", "StepRunner", "train_epoch", "EpochResult", "predict", "evaluate",
           "score", "Scores", "input_normalization", "loss_function", "use_cuda_graph", "OptimizerSettings",
           "build_optimizer", "build_scheduler", "lr_as_tensors", "channels_last", "EVAL_BATCH_SIZE"]

POSTFIX_EVERY = 50  # steps between progress-bar updates, each of which waits for the device


# --------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------

def training_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, loss_fn, x: torch.Tensor,
                  y: torch.Tensor, loss_sum: torch.Tensor | None = None,
                  correct: torch.Tensor | None = None, amp: "Amp | None" = None,
                  grad_scale: float = 1.0) -> torch.Tensor:
    """One full step: clear gradients (set to None: no zeroing kernels), forward, loss, backward,
    optimizer step, and, given the running sums, loss_sum += loss * len(y) and correct += the right
    predictions, in place on the device. Returns the loss tensor (not .item(): that would
    synchronise the device).

    optimizer=None leaves out the update (the model's gradients are cleared instead): forward, loss
    and backward only, what a benchmark of those wants. A GradScaler (amp fp16) needs an optimizer.
    grad_scale multiplies the loss that is differentiated, not the one summed (distributed.Ranks.grad_scale).
    """
    if optimizer is None:
        model.zero_grad(set_to_none=True)
    else:
        optimizer.zero_grad(set_to_none=True)
    if amp is None:
        logits = model(x)
        loss = loss_fn(logits, y)
    else:
        with torch.autocast(amp.device_type, dtype=amp.dtype):
            logits = model(x)
            loss = loss_fn(logits, y)
    differentiated = loss if grad_scale == 1.0 else loss * grad_scale
    if amp is not None and amp.scaler is not None:
        amp.scaler.scale(differentiated).backward()
        amp.scaler.step(optimizer)
        amp.scaler.update()
    else:
        differentiated.backward()
        if optimizer is not None:
            optimizer.step()
    if loss_sum is not None:
        with torch.no_grad():
            loss_sum.add_(loss.detach(), alpha=len(y))
            correct.add_((logits.argmax(1) == y).sum())
    return loss


@dataclass
class Amp:
    """Automatic mixed precision for training_step: forward and loss under
    torch.autocast(device_type, dtype); for float16 a GradScaler scales the loss (float16's range
    loses small gradients otherwise), bfloat16 needs none. The parameters stay float32."""
    device_type: str
    dtype: torch.dtype
    scaler: "torch.amp.GradScaler | None" = None

    @classmethod
    def of(cls, name: str, device_type: str) -> "Amp | None":
        """From the CLI's --amp: "off" (None), "fp16" or "bf16"."""
        if name == "off":
            return None
        if name == "fp16":
            return cls(device_type, torch.float16, torch.amp.GradScaler(device_type))
        return cls(device_type, torch.bfloat16)


def capture(step: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """Capture step() in a CUDA graph and return the graph's replay. CUDA only.

    As in PyTorch's whole-network capture recipe: `warmup` calls on a side stream first (they compile
    the kernels and create the optimizer state and the split-reduction counters; they are real steps),
    then the capture, which records the step without running it. step() sets the gradients to None
    first, so backward allocates them from the graph's private pool, and every replay rewrites them
    in place before the captured optimizer step reads them. Whatever the step reads (inputs, the
    learning rate) must live in tensors that are updated in place between replays.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def use_cuda_graph(choice: str, fused: bool, device: torch.device) -> bool:
    """Whether to capture the step (choice "auto", "on" or "off"): auto is on for the fused model on
    CUDA, where launching a dozen small kernels one by one from Python costs more than the
    arithmetic; on asks for it on any model, and is a ValueError off CUDA."""
    if choice == "on" and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, and this run is on {device.type}")
    return choice == "on" or (choice == "auto" and fused and device.type == "cuda")


class StepRunner:
    """Runs training_step on batches copied into static buffers (one batch long), the running loss
    and accuracy accumulating in static device tensors, so that with graph=True the step can be
    captured in a CUDA graph at the first full batch and replayed for the others (the batches are
    copied into the buffers only then; without a graph each step runs on its batch).

    A batch shorter than the buffers (an epoch's last, when batch_size does not divide the data)
    runs eagerly: the same step function, uncaptured, on the batch itself. If the capture fails,
    one line says why and every step runs eagerly: the graph is an optimisation, never a reason to
    fail.
    """

    def __init__(self, model, optimizer, loss_fn, x, y, batch_size: int, *, graph: bool = False, amp=None,
                 ranks: distributed.Ranks = distributed.ONE):
        self.model, self.optimizer, self.loss_fn, self.graph, self.amp = model, optimizer, loss_fn, graph, amp
        self.ranks = ranks
        self.batch_size = min(batch_size, len(x))  # the global batch
        full = ranks.share(self.batch_size)  # this rank's share of a full global batch
        n = full.stop - full.start
        self.grad_scale = ranks.grad_scale(min(batch_size, len(x)))
        self.x = torch.empty_like(x[:n])  # keeps the data's layout (channels-last on the CPU)
        self.y = torch.empty_like(y[:n])
        self.loss_sum = torch.zeros((), device=x.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=x.device)
        self.replay = None

    def reset(self) -> None:
        """Zero the running sums, in place: a captured graph holds their addresses."""
        self.loss_sum.zero_()
        self.correct.zero_()

    def _step(self, x=None, y=None, grad_scale=None) -> None:
        training_step(self.model, self.optimizer, self.loss_fn, self.x if x is None else x,
                      self.y if y is None else y, self.loss_sum, self.correct, amp=self.amp,
                      grad_scale=self.grad_scale if grad_scale is None else grad_scale)

    def __call__(self, xb, yb) -> None:
        """One step on the global batch (xb, yb): this rank's share of it."""
        n = len(yb)
        if self.ranks.enabled:
            part = self.ranks.share(n)
            xb, yb = xb[part], yb[part]
        if (self.replay is None and not self.graph) or len(xb) != len(self.x):
            # No graph, or the last partial batch, which runs eagerly (see the class docstring).
            self._step(xb, yb, self.ranks.grad_scale(n))
            return
        self.x.copy_(xb)
        self.y.copy_(yb)
        if self.replay is not None:
            self.replay()
            return
        self.graph = False  # one try
        try:
            # The warm-up call is this batch's real step; the capture records without running.
            self.replay = capture(self._step, warmup=1)
        except Exception as e:  # noqa: BLE001 -- any failure: train on without the graph
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            print(f"cuda graph: capture failed ({reason}); training without it", file=sys.stderr)


class EpochResult(NamedTuple):
    loss: float  # the running mean over the epoch, while the weights changed
    accuracy: float
    seconds: float


def train_epoch(steps: StepRunner, scheduler, x, y, *, generator, augment: bool = False,
                desc: str = "") -> EpochResult:
    """One pass over (x, y) through `steps`, the scheduler stepped after every batch. Waits for the
    device only for the bar."""
    from tqdm import tqdm

    steps.model.train()
    steps.reset()
    seen = 0
    batch_size = steps.batch_size
    start = time.perf_counter()
    # disable=None: no bar when stderr is not a terminal (logs and CI stay clean)
    with tqdm(total=math.ceil(len(x) / batch_size), desc=desc, unit="batch", leave=False, disable=None,
              dynamic_ncols=True) as bar:
        for step, (xb, yb) in enumerate(data.batches(x, y, batch_size, generator=generator, augment=augment), 1):
            steps(xb, yb)
            if scheduler is not None:
                scheduler.step()  # outside the graph: it updates the learning-rate tensors in place
            seen += len(yb)
            if not bar.disable:
                bar.update()
                if step % POSTFIX_EVERY == 0:
                    bar.set_postfix(loss=f"{steps.loss_sum.item() / seen:.4f}",
                                    acc=f"{steps.correct.item() / seen:.2%}", refresh=False)
    # .item() waits for the device; under several ranks, the sums of every rank's share.
    loss_sum, correct = distributed.all_sum([steps.loss_sum.item(), steps.correct.item()], steps.loss_sum.device,
                                            steps.ranks)
    return EpochResult(loss_sum / seen, correct / seen, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------
# Evaluation and prediction
# --------------------------------------------------------------------------------------------------

class Scores(NamedTuple):
    loss: float  # the mean over the images
    accuracy: float


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """Logits for all of x, in large batches, in eval mode, with no autograd bookkeeping."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def score(logits: torch.Tensor, y: torch.Tensor, loss_fn) -> Scores:
    """The mean loss and the accuracy of `logits` against the labels y."""
    with torch.inference_mode():
        loss = loss_fn(logits, y)
        correct = (logits.argmax(1) == y).sum()
    return Scores(loss.item(), correct.item() / len(y))


def evaluate(model, loss_fn, x, y, batch_size: int = EVAL_BATCH_SIZE,
             ranks: distributed.Ranks = distributed.ONE) -> Scores:
    """The mean loss and the accuracy of model on (x, y). Under several ranks each evaluates its
    share of (x, y) and the sums are reduced: every rank gets the scores of all of (x, y). `model`
    is then the unwrapped one (no DDP: its forward would synchronise buffers a different number of
    times on ranks with unequal shares)."""
    if not ranks.enabled:
        return score(predict(model, x, batch_size), y, loss_fn)
    part = ranks.share(len(y))
    n = part.stop - part.start
    mine = score(predict(model, x[part], batch_size), y[part], loss_fn) if n else Scores(0.0, 0.0)
    loss_sum, correct = distributed.all_sum([mine.loss * n, mine.accuracy * n], x.device, ranks)
    return Scores(loss_sum / len(y), correct / len(y))


def input_normalization(name: str, dataset: str) -> tuple[float, float]:
    """The (mean, std) that the network `name` takes its input normalised with, (pixel/255 - mean)/std:
    the network's own, where it declares one as `normalization` (the 1998 LeNet-5: background -0.1,
    ink 1.175 on any dataset), else the dataset's (fastlenet.data.NORMALIZATION)."""
    from fastlenet.models import NETWORKS

    own = getattr(NETWORKS.get(name), "normalization", None)
    return own if own is not None else data.NORMALIZATION[dataset]


def loss_function(fused: bool, model: str | None = None):
    """The training criterion of the network named `model` (a fastlenet.names name; None: one of
    logits): cross-entropy over the logits, or for lenet5-1998 the paper's MAP criterion over its
    scores, which is cross-entropy with one more logit fixed at -MAP_J (fastlenet.lenet1998.map_loss).
    fastlenet's Triton kernel for the fused model, PyTorch's for the reference."""
    map_criterion = model == "lenet5-1998"
    if fused:
        from fastlenet.functional import cross_entropy  # imports Triton: only when asked for
        if map_criterion:
            from fastlenet.lenet1998 import MAP_J

            return functools.partial(cross_entropy, constant_logit=-MAP_J)
        return cross_entropy
    if map_criterion:
        from fastlenet.lenet1998 import map_loss

        return map_loss
    from torch.nn.functional import cross_entropy

    return cross_entropy


def channels_last(model: nn.Module, *images: torch.Tensor | None):
    """The model and image tensors in NHWC layout, which PyTorch's CPU kernels handle faster for
    LeNet's few channels (oneDNN's conv1 weight gradient and max-pooling most of all): about 10-15%
    per training step and 40% at inference on a 2-core EPYC. Values and state_dict are unchanged;
    an image tensor that is None (no validation split) stays None."""
    layout = torch.channels_last
    return (model.to(memory_format=layout), *(x if x is None else x.contiguous(memory_format=layout) for x in images))


# --------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedules
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizerSettings:
    """What build_optimizer reads. The training CLI passes its parsed flags, which have these names."""
    optimizer: str  # "adam" | "sgd"
    lr: float
    momentum: float  # SGD's (Adam keeps torch's betas)
    weight_decay: float


def build_optimizer(model: nn.Module, settings, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam or SGD over the model's parameters, as `settings` (an OptimizerSettings, or anything with
    its attributes) says.

    fused=True: one kernel for the whole update, on the GPU and (torch >= 2.4) on the CPU, where it
    makes a batch-64 LeNet-5 step about 10% faster than the default per-parameter loop.
    capturable=True (for a CUDA graph) keeps Adam's step counters on the device; torch allows it with
    fused=True. Fused SGD keeps no counter and has no such setting.
    """
    if settings.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=True,
                                capturable=capturable)
    return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay, fused=True)


def build_scheduler(optimizer, schedule: str, total_steps: int, done_steps: int, saved_state: dict | None,
                    cycle_momentum: bool = True):
    """The per-batch learning-rate schedule ("onecycle", "cosine" or "none": None), positioned after
    `done_steps` steps.

    Both schedules are closed-form functions of the step, so a resumed run with more epochs than
    before stretches the schedule over the new total instead of failing past its end.
    cycle_momentum=False keeps onecycle off the momentum (Adam's beta1): torch's fused optimizers
    take it as a Python number, which a CUDA graph fixes at capture.
    """
    if schedule == "none":
        return None
    last = done_steps - 1  # constructors step once: -1 starts at step 0
    if schedule == "onecycle":
        momentum_group = optimizer.param_groups[0]
        cycle = cycle_momentum and ("betas" in momentum_group or momentum_group.get("momentum", 0) > 0)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g.get("max_lr", g["lr"]) for g in optimizer.param_groups],
            # OneCycleLR divides by its warm-up length, 0.25 * total - 1 steps: under 5 steps in all
            # it would divide by zero, so a run that short gets the first steps of a 5-step cycle.
            total_steps=max(total_steps, done_steps + 1, 5), pct_start=0.25, cycle_momentum=cycle,
            last_epoch=last)
        same_length = saved_state is not None and saved_state.get("total_steps") == total_steps \
            and saved_state.get("cycle_momentum") == cycle
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)),
            last_epoch=last)
        same_length = False
    if same_length:
        scheduler.load_state_dict(saved_state)
    return scheduler


def lr_as_tensors(optimizer, device: torch.device) -> None:
    """Each group's learning rate as a 1-element tensor on `device`: what a captured optimizer step
    reads at every replay, and what the schedulers update in place (fill_) between replays."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
