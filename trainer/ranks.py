"""This process's place among the training ranks, and the few collectives the trainer needs.
Each works in a single process too (no process group: rank 0 of 1)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def from_rank0(value):
    """Rank 0's `value`, on every rank."""
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    values = [value] * world_size()
    if dist.is_initialized():
        dist.all_gather_object(values, value)
    return values


def collective_device() -> torch.device:
    """Where a collective's tensors must be: a process group with no CPU backend (NCCL's, e.g.
    'cuda:nccl') reduces only tensors on this process's GPU; gloo takes CPU tensors."""
    if dist.is_initialized() and "cpu:" not in dist.get_backend_config():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()
