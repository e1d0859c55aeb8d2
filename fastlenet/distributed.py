"""Training on several processes with torch.distributed, as torchrun starts them.

    torchrun --nproc-per-node 2 -m fastlenet.train [--fused] ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `Ranks.from_environment` reads them (one process
without them). Every rank builds the same model from the same seed and draws the same batch order
from the same generator, then takes its share of each global batch (`share`): the global batch and
its order are those of one process with the same --batch-size. DistributedDataParallel averages the
ranks' gradients over its buckets, overlapped with the backward, through the autograd hooks of every
parameter, fused layers' as stock ones'. Where the shares of a batch are unequal (a batch size the
ranks do not divide, an epoch's last batch), each rank scales its loss's gradient by
`grad_scale` so that DDP's mean over ranks is the global batch's mean gradient.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from torch import nn


# Where a collective's error says that a peer died or stopped answering: gloo raises a plain
# RuntimeError from its transport ("Connection reset by peer", "Timed out waiting ..."); NCCL and
# the c10d store raise DistError (DistBackendError, DistNetworkError, DistStoreError).
_LOST_MARKERS = ("gloo/transport", "Connection reset", "Connection closed", "Timed out", "timed out", "NCCL")


def lost(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another rank died or hung."""
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(e, dist_error):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _LOST_MARKERS)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that prints and writes."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @classmethod
    def from_environment(cls) -> "Ranks":
        """The ranks torchrun (or any launcher setting the same variables) started; one process otherwise."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as e:
            raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({e})") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK {rank} is not one of WORLD_SIZE {world} ranks")
        return cls(rank, world, local)

    def share(self, n: int) -> slice:
        """This rank's contiguous part of n items: sizes differ by at most one, ranks in order."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def grad_scale(self, n: int) -> float:
        """The factor on this rank's mean loss that makes DDP's mean over ranks the mean over all n."""
        part = self.share(n)
        return (part.stop - part.start) * self.world / n


ONE = Ranks()  # one process, no torch.distributed


class Stopped(Exception):
    """The launcher asked this rank to stop (torchrun's SIGTERM, when another rank has failed)."""


def stop_on_sigterm() -> None:
    """Turn SIGTERM into Stopped, so that a rank torchrun stops says so in one line (what it was
    doing is dropped; the last checkpoint was written whole, atomically)."""
    import signal

    def handler(signum, frame):
        ignore_sigterm()  # once: a second one must not interrupt the first one's handling
        raise Stopped("stopped by the launcher: another process of the run failed")
    signal.signal(signal.SIGTERM, handler)


def ignore_sigterm() -> None:
    """From here on this rank is ending by itself (it has said why): the launcher's SIGTERM must not
    interrupt that with a traceback from wherever it lands (an exit handler)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def device_of(ranks: Ranks, device: torch.device) -> torch.device:
    """One GPU per rank on CUDA (the local rank's); the CPU as asked."""
    if device.type != "cuda" or not ranks.enabled:
        return device
    if ranks.local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {ranks.local_rank} has no GPU of its own: this machine has "
                         f"{torch.cuda.device_count()}; start at most that many processes per node")
    torch.cuda.set_device(ranks.local_rank)
    return torch.device("cuda", ranks.local_rank)


def start(ranks: Ranks, device: torch.device, timeout: float) -> str | None:
    """Join the process group (NCCL on CUDA, gloo on the CPU); a collective that waits longer than
    `timeout` seconds for a rank (dead or hung) raises on the others. Returns the backend, or None
    for one process."""
    if not ranks.enabled:
        return None
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world,
                            timeout=datetime.timedelta(seconds=timeout),
                            device_id=device if device.type == "cuda" else None)
    return backend


def stop() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def wrap(model: nn.Module, ranks: Ranks, device: torch.device) -> tuple[nn.Module, nn.Module, str | None]:
    """(the model to train, the model to save, a line to print or None). Under several ranks the
    model is wrapped in DistributedDataParallel; on CUDA its BatchNorm layers become SyncBatchNorm
    first (statistics of the global batch). The model to save is the unwrapped one: its state_dict
    is a one-process model's."""
    if not ranks.enabled:
        return model, model, None
    from torch.nn.parallel import DistributedDataParallel

    note = None
    if has_batch_norm(model):
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            note = "batch norm: SyncBatchNorm, statistics of the global batch"
        else:
            note = ("batch norm: each rank's statistics of its share of the batch (SyncBatchNorm needs "
                    "CUDA); the saved running statistics are rank 0's")
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, model, note


def all_sum(values: list[float], device: torch.device, ranks: Ranks) -> list[float]:
    """The sums over ranks of each value (float64), for every rank."""
    if not ranks.enabled:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
