"""torch.distributed for streamed compression: join the group torchrun set up, shard calibration batches, sum statistics.

Under `torchrun --nproc-per-node N -m edgesvd compress … --stream on` every rank reads the same
blocks, calibrates on its share of the batches (batch i goes to rank i mod N), and the Gram
matrices are summed across ranks before each block is factorized. A block's factorizations are
then split among the ranks (each layer to one rank, balanced by cost) and each rank broadcasts the
factors it computed, so every rank holds the same factors; only rank 0 writes the checkpoint.
Runs without a launcher are a group of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .statistics import ActivationStats


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks compressing one model."""

    rank: int = 0
    size: int = 1

    @property
    def writer(self) -> bool:
        """Whether this rank writes outputs (rank 0)."""
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of `items` (round robin)."""
        if self.size > 1 and len(items) < self.size:
            raise ConfigError(f"{len(items)} calibration batches cannot be shared by {self.size} processes: "
                              "use more --calib-samples or a smaller --batch-size")
        return items[self.rank::self.size]

    def sum_statistics(self, stats: ActivationStats) -> None:
        """Sum every Gram matrix and token count over the ranks, in place (the same order on every rank)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        tensors = stats.tensors()
        for key in sorted(tensors):
            dist.all_reduce(tensors[key])
        names = sorted(stats.tokens)
        counts = torch.tensor([stats.tokens[n] for n in names], dtype=torch.float64,
                              device=next(iter(tensors.values())).device if tensors else "cpu")
        dist.all_reduce(counts)
        stats.tokens.update({n: int(c) for n, c in zip(names, counts.tolist())})

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place (every rank passes the same list in the same order)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t)

    def owners(self, costs: dict[str, float]) -> dict[str, int]:
        """Which rank computes each item: the costliest first, each to the rank with the least work so
        far (the same answer on every rank, which all pass the same costs)."""
        load = [0.0] * self.size
        owner = {}
        for name in sorted(costs, key=lambda n: (-costs[n], n)):
            owner[name] = min(range(self.size), key=lambda r: (load[r], r))
            load[owner[name]] += costs[name]
        return owner

    def broadcast_owned(self, owner: dict[str, int], tensors: dict[str, list[torch.Tensor]]) -> None:
        """For each name of `owner` (in name order, the same on every rank), send its tensors from the
        rank that owns it into the tensors of the same shapes the other ranks pass, in place."""
        if self.size == 1:
            return
        import torch.distributed as dist

        for name in sorted(owner):
            for t in tensors[name]:
                dist.broadcast(t, src=owner[name])

    def mean_gradients(self, params: list[torch.Tensor]) -> None:
        """Average the gradients of `params` over the ranks (data-parallel training of one block)."""
        if self.size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        self.sum_(grads)
        for g in grads:
            g.div_(self.size)


def launched() -> bool:
    """Whether this process is one of several started by a launcher (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> Group:
    """The process group torchrun describes in the environment (WORLD_SIZE > 1), initialised on first
    use (gloo on the CPU, nccl on CUDA, one GPU per local rank); a group of one otherwise."""
    if not launched():
        return Group()
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Group(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: its own GPU (LOCAL_RANK) when running on CUDA under a launcher."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
