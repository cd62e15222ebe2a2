"""Training checkpoints: atomic writes, exact resume, and the teacher backbone in the official layout.

`checkpoint.pth` holds everything a resumed run needs to continue *as if never interrupted*: student,
teacher, optimiser, grad scaler, loss centers, the position in the data (epoch, iteration), and the RNG
states of Python, NumPy and torch.  It is written to a temporary file and renamed, so a crash during the
save leaves the previous checkpoint intact.  Every entry is a tensor or plain Python data, so the file loads
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dino.errors import UserError

CHECKPOINT_NAME = "checkpoint.pth"
TEACHER_BACKBONE_NAME = "teacher_backbone.pth"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `<path>.tmp`, fsync, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def capture_rng_state() -> dict[str, Any]:
    """RNG states as tensors / plain data (loadable with weights_only=True)."""
    version, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"version": version, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state["version"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: say which, do not guess
        raise UserError(f"cannot resume from {path}: {(str(err).splitlines() or [type(err).__name__])[0]}; "
                        "delete it or pass --resume false to start over") from None
