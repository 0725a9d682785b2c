"""Multi-process training under torchrun: the process group, this process's device, and each rank's share of a batch.

`train.batch_size` is the *global* contrastive batch. Each step, every rank takes its slice of the same global batch
(rank r the r-th of `world` near-equal slices, in order), so the rank-order concatenation of the local batches is
exactly the batch a single process would have drawn. Together with the gathered losses this makes a run on N
processes compute the same loss and the same gradients as a run on one, which the tests check. torch's
`DistributedSampler` deals indices round-robin (rank r gets positions r, r + N, ...), which groups samples into
different global batches than one process would: equivalent in distribution, not step for step, hence this sampler.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from cliptune.config import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, number of processes, and its index on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main process logs, evaluates and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()  # a run without a process group


def world() -> World:
    """The current process group's view, or a single process when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_distributed(device: torch.device) -> World:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1); otherwise one process.

    NCCL on CUDA devices, gloo on CPU. An already initialised group (tests, notebooks) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return world()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    # A long evaluation on rank 0 keeps the others waiting at a barrier: allow it rather than time out at 10 min.
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return world()


def local_device(device: torch.device, where: World) -> torch.device:
    """Each process of a multi-GPU run drives the GPU of its local rank."""
    if device.type != "cuda" or not where.distributed:
        return device
    if device.index not in (None, where.local_rank):
        raise ConfigError(
            f"runtime.device: {device} names one GPU, but under torchrun each process uses the GPU of its "
            f"LOCAL_RANK; set runtime.device to cuda or auto"
        )
    local = torch.device("cuda", where.local_rank)
    torch.cuda.set_device(local)
    return local


def check_batch(batch_size: int, where: World) -> None:
    if batch_size % where.size:
        raise ConfigError(
            f"train.batch_size: {batch_size} is the global contrastive batch and must split evenly over the "
            f"{where.size} processes; use a multiple of {where.size}"
        )


def barrier(where: World) -> None:
    if where.distributed:
        dist.barrier()


def broadcast_object(obj: T, where: World) -> T:
    """Rank 0's `obj` on every rank (a decision only rank 0 can make, such as stopping early)."""
    if not where.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's slice of every global batch of a seeded permutation (see the module docstring).

    Global batches are consecutive pieces of one `randperm` drawn from `generator`. With `drop_last` the ragged end is
    dropped; otherwise (a set smaller than one batch) the one short batch is split as evenly as possible. Iteration
    starts at batch `start` of that order (a mid-epoch resume); the length stays the whole epoch's.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        generator: torch.Generator,
        drop_last: bool,
        where: World = SINGLE,
        start: int = 0,
    ) -> None:
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.drop_last, self.where, self.start = drop_last, where, start

    @property
    def local_size(self) -> int:
        """Samples in each of this rank's batches."""
        batch = self.batch_size if self.drop_last else min(self.batch_size, self.size)
        return len(range(batch)[self.where.rank :: self.where.size])

    @property
    def local_offset(self) -> int:
        """Index, within each global batch, of this rank's first sample (`tensor_split`'s parts come first-larger)."""
        batch = self.batch_size if self.drop_last else min(self.batch_size, self.size)
        base, larger = divmod(batch, self.where.size)
        return self.where.rank * base + min(self.where.rank, larger)

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=self.generator)
        for batch in order.split(self.batch_size)[self.start : len(self)]:
            yield batch.tensor_split(self.where.size)[self.where.rank].tolist()


__all__ = [
    "SINGLE",
    "GlobalBatchSampler",
    "World",
    "barrier",
    "broadcast_object",
    "check_batch",
    "init_distributed",
    "local_device",
    "world",
]
