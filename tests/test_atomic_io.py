"""One atomic writer (dino.io) behind every output: no symlink followed, no partial file, one line on a full disk."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dino.io as dio
from dino.eval.checkpointing import atomic_torch_save as eval_save
from dino.eval.checkpointing import write_json_atomic
from dino.eval.tables import write_json
from dino.hub import save_backbone
from dino.io import DiskFullError, atomic_save_npy, atomic_torch_save, atomic_write_text
from dino.models import build_backbone
from dino.train.checkpoint import atomic_save


def _tiny_backbone():
    return build_backbone("vit_tiny", 8, depth=1, embed_dim=48, img_size=32)


WRITERS = {
    "train checkpoint": lambda path: atomic_save({"x": torch.ones(3)}, path),
    "backbone export": lambda path: save_backbone(_tiny_backbone(), path, {"arch": "vit_tiny"}),
    "eval torch": lambda path: eval_save(torch.ones(3), path),
    "eval json": lambda path: write_json_atomic({"a": 1}, path),
    "results table": lambda path: write_json(path, {"a": 1}),
    "text": lambda path: atomic_write_text(path, "hello\n"),
    "npy": lambda path: atomic_save_npy(path, __import__("numpy").ones(3, dtype="float32")),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_planted_symlinks_at_temporary_names_are_not_followed(tmp_path, writer):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out" / "file.bin"
    out.parent.mkdir()
    # every temporary name the old writers used (and obvious guesses at new ones)
    for name in ("file.bin.tmp", "file.tmp", "file.bin.tmp.npy", f"file.bin.tmp.{os.getpid()}", ".file.bin.tmp"):
        (out.parent / name).symlink_to(victim)
    WRITERS[writer](out)
    assert victim.read_text() == "precious"
    assert out.is_file() and not out.is_symlink()
    # the outputs (file.bin and any sidecar such as file.json / file.safetensors), and no temporary left over
    leftovers = [p.name for p in out.parent.iterdir() if not p.is_symlink() and not p.name.startswith("file.")]
    assert leftovers == []


def test_new_files_get_ordinary_permissions(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask


class _FullDisk:
    """A file object whose writes fail with ENOSPC after `budget` bytes, as a full disk does."""

    def __init__(self, handle, budget):
        self._handle, self._budget = handle, budget

    def write(self, data):
        if self._budget < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self._budget -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)


def test_disk_full_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_torch_save({"w": torch.zeros(4)}, path)
    before = path.read_bytes()
    real_open = dio._open_temporary
    monkeypatch.setattr(
        dio, "_open_temporary", lambda p, binary: (lambda h, t: (_FullDisk(h, 1000), t))(*real_open(p, binary))
    )
    with pytest.raises(DiskFullError) as info:
        atomic_save({"w": torch.zeros(1 << 16)}, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "no space left" in message
    assert "256.0 KiB" in message and "free" in message  # the space the file needs, from its tensors
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_a_real_write_limit_in_torch_save_is_caught(tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE → EFBIG, the ENOSPC path's twin): torch's zip writer
    raises its inline_container RuntimeError, which becomes one line and leaves nothing behind."""
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        from dino.errors import run_cli
        from dino.train.checkpoint import atomic_save
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        run_cli(lambda: atomic_save({{"w": torch.zeros(1 << 20)}}, {str(tmp_path / "ckpt.pth")!r}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ckpt.pth" in lines[0] and "4.0 MiB" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_leaves_no_partial_file(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from dino.inference.export import onnx as onnx_export

    def failing_export(model, args, f, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(DiskFullError, match="model.onnx"):
        onnx_export.export_onnx(_tiny_backbone(), tmp_path / "model.onnx", image_size=32)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_a_sharded_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """DCP writes the shards itself and wraps the kernel's refusal in a CheckpointException (a BaseException)."""
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from pathlib import Path
        from dino.errors import run_cli
        from dino.distributed.checkpoint import save_sharded
        target = Path({str(tmp_path / "ckpt")!r})
        save_sharded({{"w": torch.zeros(16)}}, target)  # a first, small checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        run_cli(lambda: save_sharded({{"w": torch.zeros(1 << 20)}}, target))
    """)
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ckpt.tmp" in lines[0] and "4.0 MiB" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    from dino.distributed.checkpoint import load_sharded

    state = {"w": torch.ones(16)}
    load_sharded(state, tmp_path / "ckpt")
    assert torch.equal(state["w"], torch.zeros(16))
