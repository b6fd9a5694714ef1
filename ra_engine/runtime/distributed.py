"""The process group of a job started by `torchrun` (WORLD_SIZE > 1), or a single process: rank 0 of 1, where
every collective is a no-op. Training shares each global batch among the processes; `ra detect` shares its inputs."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ra_engine.core.errors import RAError


def init_distributed(device_name: str) -> bool:
    """Joins the process group when started by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo otherwise. Returns
    whether this process is in a process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


class ProcessGroup:
    """This process's place among `world` processes (rank 0 of 1 alone), and the collectives a job needs."""

    def __init__(self, rank: int = 0, world: int = 1, owned: bool = False):
        self.rank, self.world, self._owned = rank, world, owned

    @classmethod
    def current(cls) -> ProcessGroup:
        """The process group torch.distributed is in now (rank 0 of 1 when there is none)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @classmethod
    def join(cls, device: str) -> ProcessGroup:
        """Joins torchrun's process group (`init_distributed`); `leave` then ends it if this call began it."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        joined_before = dist.is_initialized()
        if not init_distributed(device):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), owned=not joined_before)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def rows(self, n_local: int) -> slice:
        """This process's rows of a global batch of `n_local * world` rows: rank r holds [r*n, (r+1)*n)."""
        return slice(self.rank * n_local, (self.rank + 1) * n_local)

    def leave(self) -> None:
        if self._owned:
            dist.destroy_process_group()
            self._owned = False

    def gather(self, value) -> list:
        """`value` of every process, in rank order."""
        if not self.distributed:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def total(self, *counts: int) -> list[int]:
        """The sums over the processes of `counts`."""
        if not self.distributed:
            return list(counts)
        return [sum(column) for column in zip(*self.gather(list(counts)))]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the processes, in place."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is true on any process (a tensor on `device`, as the backend needs)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def agree(self, refusal: RAError | None) -> None:
        """Raises on every process when any refused (its own refusal, else the first other's)."""
        refusals = self.gather(None if refusal is None else str(refusal))
        if refusal is not None:
            raise refusal
        for rank, message in enumerate(refusals):
            if message is not None:
                raise RAError(f"process {rank} of {self.world} refused: {message}")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
