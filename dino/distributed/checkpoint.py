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

Reading is safe against crafted folders: DCP's own reader unpickles `.metadata` with plain `pickle` and
loads non-tensor entries with `torch.load(weights_only=False)`, so a folder passed as "weights" could run
code.  `SafeFileSystemReader` reads the metadata with an unpickler that admits only DCP's metadata classes
(plus torch.Size / dtypes / paths) and `SafeLoadPlanner` loads non-tensor entries with `weights_only=True`;
every load in the project goes through them.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dino.distributed.dist import barrier, is_enabled, is_main_process
from dino.errors import UserError
from dino.io import DiskFullError, disk_full_message, is_disk_full, tensor_bytes

METADATA_FILE = ".metadata"  # written last by DCP: its presence marks a complete checkpoint


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns that it 'assumes' a single process when no group exists; here that is the design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class UnsafeCheckpointError(UserError):
    """A sharded checkpoint whose metadata or entries hold something other than plain checkpoint data."""


# What a genuine DCP `.metadata` pickle references (torch 2.1 – 2.14): the metadata dataclasses, the
# storage index of the file system writer, torch.Size / dtypes / layouts, and the checkpoint path.
_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint._extension": {"StreamTransformExtension"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import torch

        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refers to {module}.{name}, which a checkpoint index never holds")


def read_metadata_safely(directory: str | os.PathLike):
    """The `Metadata` of a DCP checkpoint, unpickled with only DCP's own classes allowed."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = Path(directory) / METADATA_FILE
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(
            f"refusing the sharded checkpoint {directory}: its {METADATA_FILE} {err}; "
            "it was not written by torch.distributed.checkpoint (or was tampered with)"
        ) from None
    except OSError as err:
        raise UserError(f"cannot read the sharded checkpoint {directory}: {err.strerror or err}") from None
    except Exception as err:  # truncated or garbage pickle
        raise UserError(
            f"cannot read the sharded checkpoint {directory}: its {METADATA_FILE} is damaged "
            f"({(str(err).splitlines() or [type(err).__name__])[0]})"
        ) from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(
            f"refusing the sharded checkpoint {directory}: {METADATA_FILE} holds a "
            f"{type(metadata).__name__}, not checkpoint metadata"
        )
    # Shard files must be plain names inside the folder (a crafted index must not read files elsewhere) and
    # regular files (a FIFO would block the load forever).
    names = set()
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None) if isinstance(info, _StorageInfo) else None
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
            raise UnsafeCheckpointError(
                f"refusing the sharded checkpoint {directory}: its index points outside the folder ({name!r})"
            )
        names.add(name)
    for name in sorted(names):
        try:
            mode = os.stat(Path(directory) / name).st_mode
        except FileNotFoundError:
            raise UserError(
                f"the sharded checkpoint {directory} is incomplete: its shard file {name} is missing"
            ) from None
        except OSError as err:
            raise UserError(f"cannot read the sharded checkpoint {directory}: {name}: {err.strerror or err}") from None
        if not stat.S_ISREG(mode):
            raise UnsafeCheckpointError(f"refusing the sharded checkpoint {directory}: {name} is not a regular file")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        """DCP's file reader with `read_metadata` going through `read_metadata_safely`."""

        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata_safely(self.path)
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader


def _safe_planner_class():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        """Non-tensor entries (optimiser hyper-parameters) loaded with `weights_only=True`, not full pickle."""

        def load_bytes(self, read_item, value) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as err:
                raise UnsafeCheckpointError(
                    f"refusing entry {read_item.dest_index.fqn!r} of a sharded checkpoint: "
                    f"{(str(err).splitlines() or [''])[0]}"
                ) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner


def safe_reader(directory: str | os.PathLike):
    """A DCP storage reader for `directory` that never unpickles anything but checkpoint metadata."""
    return _safe_reader_class()(str(directory))


def safe_planner():
    return _safe_planner_class()()


def _complete(directory: Path) -> bool:
    return (directory / METADATA_FILE).is_file()


def find_sharded_checkpoint(directory: str | Path) -> Path | None:
    """`directory` when it holds a complete DCP checkpoint, else the `.old` copy of an interrupted swap."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if _complete(candidate):
            return candidate
    return None


def save_sharded(
    state: dict[str, Any], directory: str | Path, write_extra: Callable[[Path], None] | None = None
) -> None:
    """Collective: every rank writes its shards of `state` (tensors / DTensors, nested dicts) to `directory`.

    `write_extra(tmp_dir)` runs on every rank after the shards are written and before the swap, for small
    per-rank files (RNG states) or rank-0 metadata that must be part of the same atomic checkpoint.
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    if is_main_process():
        _remove(tmp)
        tmp.mkdir(parents=True)  # a fresh folder: mkdir never follows a symlink planted under this name
    barrier()
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process_is_intended():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not is_enabled())
    except CheckpointException as err:  # a BaseException wrapping each rank's error (a full disk among them)
        failures = [failure for failure, _ in err.failures.values()]
        if any(is_disk_full(failure) for failure in failures):
            if is_main_process():
                _remove(tmp)  # the previous checkpoint under `directory` is untouched
            raise DiskFullError(disk_full_message(tmp, tensor_bytes(state), failures[0])) from None
        raise
    if write_extra is not None:
        write_extra(tmp)
    barrier()
    if is_main_process():
        _remove(old)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        _remove(old)
    barrier()


def _remove(path: Path) -> None:
    """Remove a folder left by an earlier save, or a symlink/file planted in its place (never its target)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def load_sharded(state: dict[str, Any], directory: str | Path, single_process: bool = False) -> None:
    """Collective: fill `state` (same structure as saved; tensors or DTensors of any sharding) in place.

    `single_process`: read in this process alone even inside a process group (offline consolidation).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    read_metadata_safely(directory)  # refuse a crafted index here, before DCP wraps the error in its own
    try:
        with _single_process_is_intended():
            dcp.load(
                state,
                storage_reader=safe_reader(directory),
                planner=safe_planner(),
                no_dist=single_process or not is_enabled(),
            )
    except CheckpointException as err:  # a BaseException carrying each rank's error: surface ours as it is
        failures = [failure for failure, _ in err.failures.values()]
        for failure in failures:
            if isinstance(failure, UserError):
                raise failure from None
        first = failures[0] if failures else err
        detail = (str(first).splitlines() or [type(first).__name__])[0]
        raise UserError(f"cannot read the sharded checkpoint {directory}: {type(first).__name__}: {detail}") from None


def saved_keys(directory: str | Path) -> set[str]:
    """The flattened keys stored in a DCP checkpoint (nested dicts joined by '.', e.g. 'optimizer.state.x.step')."""
    return set(read_metadata_safely(directory).state_dict_metadata)


def copy_sharded(directory: str | Path, destination: str | Path) -> None:
    """Rank 0 copies a finished checkpoint directory (e.g. to keep an epoch's snapshot)."""
    if is_main_process():
        destination = Path(destination)
        _remove(destination)
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
