"""Data-parallel runs under torchrun (torch.distributed), and the same code on one process.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `init_distributed` joins the process group (NCCL
on GPUs, gloo on CPU). Training splits every global batch of the recipe across ranks, so the
optimisation sees the same batches whatever the world size (and resumes with another one);
evaluation gives each rank a contiguous shard, with no padding, and gathers the outputs in
order, so top-1 and Recall@K equal a single-process run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from finegrain.errors import FinegrainError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1 (idempotent); else a one-process info."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return DistInfo(rank, world_size, local_rank)


def current() -> DistInfo:
    """The running process's place in the group (one process when none was initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(info: DistInfo) -> torch.device:
    return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def shard_range(count: int, rank: int, world_size: int) -> range:
    """Contiguous, near-equal, non-overlapping shards covering 0..count-1 (no padding)."""
    start = count * rank // world_size
    return range(start, count * (rank + 1) // world_size)


def rank_slice(batch: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's part of one global batch (the global batch must divide evenly)."""
    if len(batch) % world_size:
        raise FinegrainError(f"The global batch of {len(batch)} does not split over {world_size} processes. "
                             "Pick train.batch_size divisible by the number of processes.")
    per_rank = len(batch) // world_size
    return batch[rank * per_rank:(rank + 1) * per_rank]


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's [n_r, ...] tensor in rank order (n_r may differ); identity on one process."""
    info = current()
    if not info.enabled:
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = tensor.to(device).contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(info.world_size)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=device))
    largest = int(max(size.item() for size in sizes))
    padded = torch.zeros((largest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[: int(size.item())] for part, size in zip(gathered, sizes)]).to(tensor.device)


def barrier() -> None:
    if current().enabled:
        dist.barrier()
