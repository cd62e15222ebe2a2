"""Safe file writes: the one atomic writer every output of the project goes through.

`atomic_write(path)` hands out a file object on a temporary file and, only when the block finishes
without error, flushes it to disk and renames it over `path`.  So a crash, a pre-emption or a full disk
never leaves a truncated file under the real name: readers see the previous complete file or none.

The temporary file is created the way `tempfile.mkstemp` does it: a random name in the destination's own
folder (a rename across file systems would not be atomic), opened with `O_CREAT | O_EXCL | O_NOFOLLOW`,
so a symlink planted under a predictable name such as `checkpoint.pth.tmp` is never followed and its
target never overwritten.  A full disk (ENOSPC / EDQUOT, also when torch reports it as a
`PytorchStreamWriter … file write failed`) becomes one `DiskFullError` line naming the file, the space it
needs and the space free, and the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from dino.errors import UserError


class DiskFullError(UserError):
    """A write failed for lack of space (or a file-size limit); nothing was left at the destination."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; outputs should get the permissions an ordinary `open()` would give them.
_FILE_MODE = 0o666 & ~_current_umask()
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # unreachable, keeps type checkers quiet


def is_disk_full(err: BaseException) -> bool:
    """True for the ways a full disk (or a file-size limit) surfaces from Python, NumPy and torch.save."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _SPACE_ERRNOS:
            return True
        text = str(err)
        # torch's zip writer (inline_container.cc) turns the failed fwrite into a RuntimeError without errno
        if "No space left on device" in text or "file write failed" in text or "File too large" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_message(path: str | os.PathLike, needed: int | None, err: BaseException | None = None) -> str:
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    limit = isinstance(err, OSError) and err.errno == errno.EFBIG
    reason = "the file-size limit (ulimit -f) was reached" if limit else "no space left on device"
    parts = [f"cannot write {path}: {reason}"]
    if needed:
        parts.append(f"it needs about {format_bytes(needed)}")
    if free is not None:
        parts.append(f"{format_bytes(free)} free in {folder}")
    return "; ".join(parts) + "; nothing was written there (free some space or choose another folder)"


def _open_temporary(path: Path, binary: bool) -> tuple[IO, str]:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
    except OSError:  # some file systems (e.g. certain network mounts) refuse chmod; the 0600 file still works
        pass
    handle = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")
    return handle, tmp


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, binary: bool = True, needed_bytes: int | None = None) -> Iterator[IO]:
    """Write `path` atomically: `with atomic_write(p) as f: f.write(...)`.

    `needed_bytes` (optional) is what the file will take, for the disk-full message; without it the
    message reports how much had been written when the space ran out.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = _open_temporary(path, binary)
    try:
        try:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            try:
                written = handle.tell()
            except (OSError, ValueError):
                written = None
            with contextlib.suppress(OSError):  # closing flushes; a full disk already failed above
                handle.close()
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, Exception) and not isinstance(err, UserError) and is_disk_full(err):
            needed = needed_bytes or written
            raise DiskFullError(disk_full_message(path, needed, err)) from None
        raise
    _fsync_folder(path.parent)


@contextlib.contextmanager
def atomic_output_path(path: str | os.PathLike, needed_bytes: int | None = None) -> Iterator[str]:
    """For third-party writers that only take a file name (GGUF, safetensors): yields a fresh temporary
    name in the destination folder (created exclusively, so it is ours), renamed over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = _open_temporary(path, binary=True)
    handle.close()
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, Exception) and not isinstance(err, UserError) and is_disk_full(err):
            raise DiskFullError(disk_full_message(path, needed_bytes, err)) from None
        raise
    _fsync_folder(path.parent)


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """The bytes of the tensors and arrays in a nested structure: what torch.save will need, roughly."""
    import numpy as np
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)`, atomically (see `atomic_write`)."""
    import torch

    with atomic_write(path, needed_bytes=tensor_bytes(obj) or None) as handle:
        torch.save(obj, handle)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, needed_bytes=len(data)) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + ("\n" if indent is not None else ""))


def atomic_save_npy(path: str | os.PathLike, array) -> None:
    """`np.save` to exactly `path` (no `.npy` appended), atomically."""
    import numpy as np

    with atomic_write(path, needed_bytes=int(getattr(array, "nbytes", 0)) or None) as handle:
        np.save(handle, array, allow_pickle=False)


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy a file's bytes to `path` atomically (for outputs a third-party writer produced elsewhere)."""
    with open(source, "rb") as src, atomic_write(path, needed_bytes=os.path.getsize(source)) as handle:
        shutil.copyfileobj(src, handle, length=1 << 20)


# ------------------------------------------------------------------------------------- directory lock

LOCK_NAME = ".dino.lock"


class DirectoryInUseError(UserError):
    """Another live process holds the lock of an output directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class DirectoryLock:
    """An exclusive lock on a run's output directory, held for the life of the run.

    `fcntl.flock` on `<dir>/.dino.lock`: the kernel releases it when the holder dies, even by `kill -9`,
    so a stale lock file left by a dead run is simply taken over.  The file names the holder (PID, host,
    start time) for the message a second run gets.  On file systems without flock (some network mounts)
    the PID in the file decides: a live PID on this host holds the directory, anything else is stale.
    """

    def __init__(self, directory: str | os.PathLike, what: str = "output directory"):
        self.path = Path(directory) / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        pid = info.get("pid")
        if pid is None:
            return "another process"
        host = info.get("host")
        since = info.get("since")
        return f"process {pid}" + (f" on {host}" if host else "") + (f" (running since {since})" if since else "")

    def acquire(self) -> "DirectoryLock":
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise UserError(f"cannot use {self.path.parent} as {self.what}: it is a file, not a folder")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            raise UserError(f"cannot use {self.path.parent} as {self.what}: {err.strerror or err}") from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DirectoryInUseError(
                f"{self.what} {self.path.parent} is in use by {self._holder()}; wait for that "
                f"run to finish, stop it, or choose another output directory"
            ) from None
        except (ImportError, OSError):  # no flock here: fall back to the PID written in the file
            holder = self._pid_in_file()
            if holder is not None and holder != os.getpid() and _pid_alive(holder):
                os.close(fd)
                raise DirectoryInUseError(
                    f"{self.what} {self.path.parent} is in use by {self._holder()}; wait for "
                    "that run to finish, stop it, or choose another output directory"
                ) from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _pid_in_file(self) -> int | None:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return int(info["pid"]) if info.get("host") in (None, socket.gethostname()) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # no holder named any more; the file itself stays (removing it races)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = [
    "DirectoryInUseError",
    "DirectoryLock",
    "DiskFullError",
    "atomic_copy",
    "atomic_output_path",
    "atomic_save_npy",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "disk_full_message",
    "format_bytes",
    "is_disk_full",
]
