"""Ranks, process groups and cross-rank reductions.

Every function works in a single process without `torch.distributed` initialised: it then behaves as a
world of size 1, so the rest of the code never branches on "are we distributed?".
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch
import torch.distributed as tdist


def is_enabled() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_enabled() else 1


def get_local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size() if is_enabled() else 1))


def is_main_process() -> bool:
    return get_rank() == 0


def launched_with_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(backend: str) -> None:
    """Join the process group when launched by torchrun (env:// rendezvous); otherwise stay single-process."""
    if is_enabled() or not launched_with_torchrun():
        return
    tdist.init_process_group(backend=backend, init_method="env://")


def barrier() -> None:
    if is_enabled():
        tdist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (identity in a single process) and return it."""
    if is_enabled() and get_world_size() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    all_reduce_sum(tensor)
    return tensor.div_(get_world_size())


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from every rank along dim 0 (rank order)."""
    if not is_enabled() or get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    tdist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; every rank gets a different but deterministic seed."""
    seed = int(seed) + get_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def same_seed_on_every_rank(seed: int):
    """Run the block with torch's CPU generator seeded by `seed` on *every* rank, then restore it.

    Weight initialisation must agree across ranks: FSDP2 shards each rank's own initial tensor, and the
    teacher is a copy that DDP does not broadcast.  Per-rank randomness (drop path) keeps `seed + rank`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a SIGTERM that reached one process)."""
    if not is_enabled() or get_world_size() == 1:
        return bool(flag)
    tensor = torch.tensor([1.0 if flag else 0.0])
    if tdist.get_backend() == "nccl":
        tensor = tensor.cuda()
    all_reduce_sum(tensor)
    return bool(tensor.item() > 0)
