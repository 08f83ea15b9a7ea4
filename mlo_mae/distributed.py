"""Data parallelism for the three levels without DDP: explicit averages over ranks.

DDP averages gradients in hooks on ``loss.backward()``. The hypergradient is
built with ``autograd.grad`` and a finite difference that calls the model
functionally, so DDP's hooks would miss it. The engine therefore takes a
``sync`` function and calls it wherever ranks must agree (see
``MLOEngine._optimizer_step`` and ``hypergradient.hyper_direction``). This
module provides that function over ``torch.distributed`` (gloo on CPU, NCCL on
CUDA; ``no_sync`` for one process), and a checksum to prove that replicas
stayed identical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

# What the engine calls wherever ranks must agree: average these tensors over ranks, in place.
Sync = Callable[[Sequence[torch.Tensor]], None]


def no_sync(tensors: Sequence[torch.Tensor]) -> None:
    """Single process: nothing to average."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def allreduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Replace every tensor by its mean over ranks, in place: one all-reduce per dtype."""
    world = world_size()
    if world == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def module_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter's and buffer's bytes, in state-dict order: equal iff bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def gather_objects(obj: object) -> list[object]:
    """``obj`` from every rank, in rank order (a list of one without a process group)."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
