"""Atomic writes for evaluation outputs: results JSON, feature dumps, linear-probe checkpoints.

Each file is written under a temporary name in the same folder and renamed into place (`os.replace` is
atomic on POSIX), so a crash or a pre-empted job never leaves a truncated file under the real name, and a
resumed run either finds the previous complete file or none.
"""

from __future__ import annotations

import os
from typing import Any

from dino.io import atomic_torch_save as _atomic_torch_save
from dino.io import atomic_write_json


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` through `dino.io.atomic_write` (unique temporary file, fsync, rename)."""
    _atomic_torch_save(obj, path)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` as indented JSON through `dino.io.atomic_write`."""
    atomic_write_json(path, obj, indent=1)
