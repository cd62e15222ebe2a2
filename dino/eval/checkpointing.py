"""Atomic writes for evaluation outputs: results JSON, feature dumps, linear-probe checkpoints.

Each file is written under a temporary name in the same folder and renamed into place (`os.replace` is
atomic on POSIX), so a crash or a pre-empted job never leaves a truncated file under the real name, and a
resumed run either finds the previous complete file or none.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch


def _temporary_name(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` through a temporary file and a rename."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temporary_name(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` as indented JSON through a temporary file and a rename."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temporary_name(path)
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=1)
    os.replace(tmp, path)
