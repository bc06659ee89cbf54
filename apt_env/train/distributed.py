"""More than one process: torchrun's environment, gloo on CPU and nccl (with gloo for CPU tensors) on GPU."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)


def init_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join torchrun's process group when there is one; returns ``(rank, world_size, device)``.

    A single process (plain ``python``) gets rank 0 of 1 and no process group.

    Args:
        device: the requested device; default ``cuda`` (this rank's GPU) when available, else ``cpu``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if world_size == 1:
        return 0, 1, torch.device(device or ("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(use_cuda))
    rank = dist.get_rank()
    _logger.info("rank %d of %d (%s)", rank, world_size, dist.get_backend())
    return rank, world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def backend_for(use_cuda: bool) -> str:
    """The process group backend: nccl for CUDA tensors, gloo for CPU tensors (NCCL has no CPU
    collectives, and a CPU tensor can still meet a collective on a GPU run)."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Average gradients over the ranks in one flat all-reduce (what DDP does for a module whose
    training calls other methods than ``forward``, such as an RL policy)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_object(value: Any) -> Any:
    """Rank 0's (picklable) value on every rank (itself in one process)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's (picklable) value, in rank order, on every rank (``[value]`` in one process)."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_int(value: int) -> int:
    """Rank 0's value on every rank (itself in one process)."""
    return int(broadcast_object(int(value)))


def state_digest(module: torch.nn.Module) -> str:
    """A short hash of a module's weights, to check that the ranks agree."""
    data = b"".join(t.detach().cpu().numpy().tobytes() for t in module.state_dict().values())
    return hashlib.sha256(data).hexdigest()[:16]
