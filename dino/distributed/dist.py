"""Ranks, process groups and cross-rank reductions.

Every function works in a single process without `torch.distributed` initialised: it then behaves as a
world of size 1, so the rest of the code never branches on "are we distributed?".
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import random
import time

import numpy as np
import torch
import torch.distributed as tdist

# The rank this process had in a process group that `destroy_distributed` has since closed: code that runs
# after training (the kNN report, the SLURM requeue) must still know that it is not rank 0.
_finished_rank: int | None = None


def is_enabled() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    if is_enabled():
        return tdist.get_rank()
    return _finished_rank or 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_enabled() else 1


def get_local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size() if is_enabled() else 1))


def is_main_process() -> bool:
    return get_rank() == 0


def launched_with_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(backend: str, timeout_s: float | None = None) -> bool:
    """Join the process group when launched by torchrun (env:// rendezvous); otherwise stay single-process.

    `timeout_s` bounds every collective (gloo raises, NCCL aborts): a peer that hangs does not make the
    others wait forever.  Returns whether this call created the group (its owner destroys it).
    """
    global _finished_rank
    if is_enabled() or not launched_with_torchrun():
        return False
    kwargs = {"timeout": datetime.timedelta(seconds=float(timeout_s))} if timeout_s else {}
    tdist.init_process_group(backend=backend, init_method="env://", **kwargs)
    # A group still open when the interpreter exits can abort in the backend's threads ("terminate called
    # without an active exception", exit -6): every entry point that joins one leaves it at exit at the latest.
    atexit.register(destroy_distributed)
    _finished_rank = None
    global _timeout_s
    _timeout_s = float(timeout_s) if timeout_s else None
    return True


def destroy_distributed() -> None:
    """Leave the process group (remembering this process's rank, see `_finished_rank`)."""
    global _finished_rank
    if is_enabled():
        rank = tdist.get_rank()
        tdist.destroy_process_group()
        _finished_rank = rank


# ------------------------------------------------------------------------ who did not answer a collective

_timeout_s: float | None = None
_HEARTBEAT_KEY = "dino/heartbeat/{rank}"
# Where a rank is inside a step, in order: a rank behind the reporting one is what hung.
_PHASES = ("data", "batch", "step", "done")
_PHASE_TEXT = {
    "data": "waiting for its data",
    "batch": "had its batch but never entered the step",
    "step": "inside the step's forward/backward",
    "done": "done with the step",
}
_last_beat: tuple[int, str] = (0, "done")


def _store():
    from torch.distributed import distributed_c10d

    try:
        return distributed_c10d._get_default_store()
    except Exception:  # no group, or a backend without a store
        return None


def heartbeat(step: int | None = None, phase: str = "done") -> None:
    """Record in the rendezvous store where this rank is (`step`, `phase`); no collective involved.

    Only when a `dist_timeout` was set (the user asked for the diagnosis; a store write per phase is
    cheap but not free at thousands of ranks).  When a collective then times out,
    `describe_missing_ranks` names the ranks that are behind.
    """
    global _last_beat
    _last_beat = (_last_beat[0] if step is None else int(step), phase)
    if _timeout_s is None or not is_enabled() or get_world_size() == 1:
        return
    store = _store()
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(_HEARTBEAT_KEY.format(rank=get_rank()), f"{_last_beat[0]} {phase} {time.time():.3f}")


def describe_missing_ranks() -> str:
    """'rank 1 (step 4, waiting for its data, 63 s ago)': the ranks behind this one, from their heartbeats."""
    store = _store()
    if store is None:
        return "could not reach the rendezvous store to tell which rank"
    mine = (_last_beat[0], _PHASES.index(_last_beat[1]))
    behind = []
    now = time.time()
    for rank in range(get_world_size()):
        if rank == get_rank():
            continue
        try:
            store.set_timeout(datetime.timedelta(seconds=5))
            step, phase, seen_at = store.get(_HEARTBEAT_KEY.format(rank=rank)).decode().split()
            step = int(step)
        except Exception:
            behind.append(f"rank {rank} (never reported)")
            continue
        if (step, _PHASES.index(phase)) < mine:
            behind.append(
                f"rank {rank} (step {step}, {_PHASE_TEXT[phase]}, last heard {now - float(seen_at):.0f} s ago)"
            )
    if not behind:
        return "every other rank got as far as this one; the hang is inside the collective itself"
    return "did not answer: " + ", ".join(behind)


def is_collective_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return (
        "timed out" in text
        or "timeout" in text
        or "connection closed by peer" in text
        or "connection reset" in text
        or type(err).__name__ == "DistBackendError"
    )


def collective_timeout_message(step: int, err: BaseException) -> str:
    limit = f"{_timeout_s:.0f} s" if _timeout_s else "the timeout"
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return (
        f"rank {get_rank()}: a collective at step {step} did not complete within {limit} (--dist_timeout); "
        f"{describe_missing_ranks()} [{first}]"
    )


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


def any_rank_flags(*flags: bool) -> tuple[bool, ...]:
    """`any_rank` for several flags in one all-reduce."""
    if not is_enabled() or get_world_size() == 1:
        return tuple(bool(f) for f in flags)
    tensor = torch.tensor([1.0 if f else 0.0 for f in flags])
    if tdist.get_backend() == "nccl":
        tensor = tensor.cuda()
    all_reduce_sum(tensor)
    return tuple(bool(v > 0) for v in tensor.tolist())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a SIGTERM that reached one process)."""
    if not is_enabled() or get_world_size() == 1:
        return bool(flag)
    tensor = torch.tensor([1.0 if flag else 0.0])
    if tdist.get_backend() == "nccl":
        tensor = tensor.cuda()
    all_reduce_sum(tensor)
    return bool(tensor.item() > 0)
