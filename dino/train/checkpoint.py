"""Training checkpoints: atomic writes, exact resume, and the teacher backbone in the official layout.

`checkpoint.pth` holds everything a resumed run needs to continue *as if never interrupted*: student,
teacher, optimiser, grad scaler, loss centers, the position in the data (epoch, iteration), and the RNG
states of Python, NumPy and torch.  It is written to a temporary file and renamed, so a crash during the
save leaves the previous checkpoint intact.  Every entry is a tensor or plain Python data, so the file loads
with `torch.load(weights_only=True)`.

Under FSDP2 (`train.parallel=fsdp`) the same content is written as a sharded DCP checkpoint in
`checkpoint_sharded/` instead (see `dino.distributed.checkpoint`): model and optimiser tensors as shards,
the training position as an int64 tensor, one `rng_rank<r>.pth` per rank and `meta.json` (config, backbone
kwargs, grad scaler).  It loads into any number of processes.  Either way `teacher_backbone.pth` is the
consolidated teacher backbone in the official key layout.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dino.distributed import get_rank, get_world_size, is_main_process
from dino.distributed.checkpoint import find_sharded_checkpoint, load_sharded, save_sharded, saved_keys
from dino.errors import UserError
from dino.io import atomic_torch_save, atomic_write_text

CHECKPOINT_NAME = "checkpoint.pth"
SHARDED_CHECKPOINT_NAME = "checkpoint_sharded"
_META_FILE = "meta.json"
# order of the integers in the sharded checkpoint's `progress` tensor
PROGRESS_FIELDS = ("epoch", "step_in_epoch", "global_step", "data_epoch", "data_batch", "world_size", "batch_size")
TEACHER_BACKBONE_NAME = "teacher_backbone.pth"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through `dino.io.atomic_write`: a unique temporary file, fsync, rename over `path`."""
    atomic_torch_save(obj, path)


def capture_rng_state() -> dict[str, Any]:
    """RNG states as tensors / plain data (loadable with weights_only=True)."""
    version, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "version": version,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["version"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: say which, do not guess
        raise UserError(
            f"cannot resume from {path}: {(str(err).splitlines() or [type(err).__name__])[0]}; "
            "delete it or pass --resume false to start over"
        ) from None


# ------------------------------------------------------------------------------ sharded (FSDP2)


def _model_and_optimizer_state(student, teacher, optimizer) -> dict[str, Any]:
    """Student, teacher and optimiser state keyed by parameter names (not wrapper-specific ids), so the
    same checkpoint loads into a sharded or an unsharded model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    student_state, optimizer_state = get_state_dict(student, optimizer)
    return {"student": student_state, "teacher": get_model_state_dict(teacher), "optimizer": optimizer_state}


def save_sharded_training_checkpoint(
    directory: Path, student, teacher, optimizer, objective, scaler, progress: dict[str, int], meta: dict[str, Any]
) -> None:
    """Collective: write the sharded checkpoint (see the module docstring) atomically to `directory`."""
    state = _model_and_optimizer_state(student, teacher, optimizer)
    state["objective"] = objective.state_dict()
    state["progress"] = torch.tensor([int(progress[name]) for name in PROGRESS_FIELDS], dtype=torch.int64)
    meta = {**meta, "scaler": scaler.state_dict() if scaler is not None else None}

    def write_rank_files(tmp: Path) -> None:
        atomic_save(capture_rng_state(), tmp / f"rng_rank{get_rank()}.pth")
        if is_main_process():
            atomic_write_text(tmp / _META_FILE, json.dumps(meta, indent=2))

    save_sharded(state, directory, write_rank_files)


def find_training_checkpoint(output_dir: Path, sharded: bool) -> Path | None:
    """The checkpoint a run in `output_dir` resumes from: `checkpoint_sharded/` under FSDP, else `checkpoint.pth`."""
    sharded_path = find_sharded_checkpoint(output_dir / SHARDED_CHECKPOINT_NAME)
    single_file = output_dir / CHECKPOINT_NAME if (output_dir / CHECKPOINT_NAME).is_file() else None
    found, other = (sharded_path, single_file) if sharded else (single_file, sharded_path)
    if found is None and other is not None:  # never restart from scratch silently next to a checkpoint
        mode, other_mode = ("fsdp", "ddp") if sharded else ("ddp", "fsdp")
        raise UserError(
            f"{output_dir} holds {other.name} from a --parallel {other_mode} run, which --parallel {mode} "
            f"does not read; resume with --parallel {other_mode}, or pass --resume false to start over"
        )
    return found


def load_sharded_training_checkpoint(
    directory: Path, student, teacher, optimizer, objective, scaler
) -> tuple[dict[str, int], dict[str, Any] | None]:
    """Collective: load a sharded checkpoint written by any number of processes into these modules.

    Returns the saved position (`PROGRESS_FIELDS`) and this rank's RNG state when the world size is the
    one it was saved with (None otherwise: per-rank streams do not map onto a different number of ranks).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _model_and_optimizer_state(student, teacher, optimizer)
    state["objective"] = objective.state_dict()
    state["progress"] = torch.zeros(len(PROGRESS_FIELDS), dtype=torch.int64)
    # The template has optimiser state for every trainable parameter (DCP initialises it), but the saving
    # run only had state for parameters that received gradients (an idle mask token has none).
    stored = saved_keys(directory)
    optimizer_state = state["optimizer"]["state"]
    without_state = [fqn for fqn in optimizer_state if not any(k.startswith(f"optimizer.state.{fqn}.") for k in stored)]
    for fqn in without_state:
        del optimizer_state[fqn]
    try:
        load_sharded(state, directory)
    except Exception as err:  # a foreign or mismatched checkpoint: say which, do not guess
        raise UserError(
            f"cannot resume from {directory}: {(str(err).splitlines() or [type(err).__name__])[0]}; "
            "delete it or pass --resume false to start over"
        ) from None
    set_model_state_dict(student, state["student"])
    # not strict: parameters without saved state (see above) are expected
    set_optimizer_state_dict(student, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
    params = dict(student.named_parameters())
    for fqn in without_state:  # as in the saving run: no state until the first gradient
        optimizer.state.pop(params[fqn], None)
    set_model_state_dict(teacher, state["teacher"])
    objective.load_state_dict(state["objective"])
    progress = dict(zip(PROGRESS_FIELDS, (int(v) for v in state["progress"].tolist())))
    meta = json.loads((directory / _META_FILE).read_text())
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    rng_file = directory / f"rng_rank{get_rank()}.pth"
    rng = None
    if progress["world_size"] == get_world_size() and rng_file.is_file():
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
    return progress, rng
