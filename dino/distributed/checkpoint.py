"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP), for FSDP2 training.

Every rank writes its own shards of a checkpoint into one directory (`__0_0.distcp`, `__1_0.distcp`, …
plus a `.metadata` index).  DCP stores each tensor with its global shape and the pieces every rank holds,
so a checkpoint written by N processes loads into M processes (or into one, unsharded): each loading
rank reads the pieces that overlap its own shards.  That is what makes resume with a different world size
work.

Writes are atomic at the directory level: shards go to `<dir>.tmp`, and only when every rank has finished
does rank 0 swap it in (`<dir>` → `<dir>.old`, `<dir>.tmp` → `<dir>`, remove `<dir>.old`).  A crash at any
point leaves a complete checkpoint under `<dir>` or, between the two renames, under `<dir>.old`, which
`find_sharded_checkpoint` falls back to.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dino.distributed.dist import barrier, is_enabled, is_main_process

METADATA_FILE = ".metadata"  # written last by DCP: its presence marks a complete checkpoint


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns that it 'assumes' a single process when no group exists; here that is the design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _complete(directory: Path) -> bool:
    return (directory / METADATA_FILE).is_file()


def find_sharded_checkpoint(directory: str | Path) -> Path | None:
    """`directory` when it holds a complete DCP checkpoint, else the `.old` copy of an interrupted swap."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if _complete(candidate):
            return candidate
    return None


def save_sharded(state: dict[str, Any], directory: str | Path,
                 write_extra: Callable[[Path], None] | None = None) -> None:
    """Collective: every rank writes its shards of `state` (tensors / DTensors, nested dicts) to `directory`.

    `write_extra(tmp_dir)` runs on every rank after the shards are written and before the swap, for small
    per-rank files (RNG states) or rank-0 metadata that must be part of the same atomic checkpoint.
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    with _single_process_is_intended():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not is_enabled())
    if write_extra is not None:
        write_extra(tmp)
    barrier()
    if is_main_process():
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_sharded(state: dict[str, Any], directory: str | Path) -> None:
    """Collective: fill `state` (same structure as saved; tensors or DTensors of any sharding) in place."""
    import torch.distributed.checkpoint as dcp

    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(directory), no_dist=not is_enabled())


def saved_keys(directory: str | Path) -> set[str]:
    """The flattened keys stored in a DCP checkpoint (nested dicts joined by '.', e.g. 'optimizer.state.x.step')."""
    import torch.distributed.checkpoint as dcp

    return set(dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata)


def copy_sharded(directory: str | Path, destination: str | Path) -> None:
    """Rank 0 copies a finished checkpoint directory (e.g. to keep an epoch's snapshot)."""
    if is_main_process():
        destination = Path(destination)
        shutil.rmtree(destination, ignore_errors=True)
        shutil.copytree(directory, destination)
    barrier()


def full_state_dict_on_rank0(module: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded state dict of `module` on CPU on rank 0 (empty on other ranks).

    Works for FSDP2 modules (gathers the shards) and for plain modules (a CPU copy).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_enabled():
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
