"""Wrapping the student for data parallelism. The model code never sees DDP; the loop asks here."""

from __future__ import annotations

import torch
from torch import nn

from dino.distributed.device import DeviceContext
from dino.distributed.dist import get_world_size
from dino.errors import UserError

PARALLEL_CHOICES = ("ddp",)


def wrap_student(student: nn.Module, ctx: DeviceContext, mode: str = "ddp") -> nn.Module:
    """DDP over all ranks (identity in a single process)."""
    if mode not in PARALLEL_CHOICES:
        raise UserError(f"unknown train.parallel {mode!r}; available: {', '.join(PARALLEL_CHOICES)}")
    if get_world_size() == 1:
        return student
    device_ids = [ctx.device.index] if ctx.type == "cuda" else None
    # unused parameters exist when a head or the mask token is idle in a step (e.g. no masked crop)
    return torch.nn.parallel.DistributedDataParallel(student, device_ids=device_ids, find_unused_parameters=True)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DDP / compile wrapper."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or getattr(module, "_orig_mod")
    return module
