"""What the training loop reports: tensorboard scalars, a JSON-lines log, and collapse indicators."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor


@torch.no_grad()
def teacher_entropy_stats(teacher_probs: Tensor) -> dict[str, float]:
    """Collapse indicators of the teacher targets p (B, K), as fractions of ln K.

    - `teacher_entropy_batch` = H(mean_b p_b) / ln K: how evenly the batch uses the prototypes
      (→ 0 when every image lands on one prototype: "dominant-dimension" collapse);
    - `teacher_entropy_sample` = mean_b H(p_b) / ln K: how flat each target is
      (→ 1 when every target is uniform: "uniform" collapse, the loss then sits at ln K).
    """
    probs = teacher_probs.float().clamp_min(1e-12)
    log_k = math.log(probs.shape[-1])
    mean_probs = probs.mean(dim=0)
    batch_entropy = -(mean_probs * mean_probs.log()).sum() / log_k
    sample_entropy = -(probs * probs.log()).sum(dim=-1).mean() / log_k
    return {"teacher_entropy_batch": float(batch_entropy), "teacher_entropy_sample": float(sample_entropy)}


def collapse_warning(stats: dict[str, float]) -> str | None:
    if stats["teacher_entropy_sample"] > 0.98:
        return (
            "teacher targets are almost uniform (entropy ≈ ln K): the run may be collapsing; try a lower "
            "teacher temperature, a higher teacher momentum or a smaller out_dim for small datasets"
        )
    if stats["teacher_entropy_batch"] < 0.02:
        return (
            "the teacher maps almost every image to one prototype: the run may be collapsing; "
            "check the centering and the teacher temperature"
        )
    return None


class MetricLogger:
    """Rank-0 sink for scalars: tensorboard under `<output_dir>/tensorboard` and `<output_dir>/metrics.jsonl`.

    `metrics.jsonl` is line-buffered: each step's line reaches the operating system when it is logged (one
    small write), so a killed process (even `kill -9`) loses nothing already logged; `sync()` also forces it
    to disk and is called before every checkpoint, so the steps a checkpoint covers are always in the log.
    `resume_step`: the step a resumed run continues from; lines logged after it by the interrupted run are
    dropped (the resumed run logs those steps again, with the same values), so each step appears once.
    """

    def __init__(
        self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None
    ):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        path = output_dir / "metrics.jsonl"
        if resume_step is not None and path.is_file():
            _drop_lines_after(path, resume_step)
        self.jsonl = open(path, "a", encoding="utf-8", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float], tensorboard: bool = True) -> None:
        if not self.enabled:
            return
        try:
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        except OSError as err:
            from dino.io import DiskFullError, disk_full_message, is_disk_full

            if is_disk_full(err):
                raise DiskFullError(disk_full_message(self.jsonl.name, None, err)) from None
            raise
        if tensorboard and self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{name}", value, step)

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image, step)

    def flush(self) -> None:
        if self.jsonl is not None:
            self.jsonl.flush()
        if self.writer is not None:
            self.writer.flush()

    def sync(self) -> None:
        """Flush and fsync the JSON-lines log (before a checkpoint: what it covers must be on disk too)."""
        self.flush()
        if self.jsonl is not None:
            os.fsync(self.jsonl.fileno())

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _drop_lines_after(path: Path, step: int) -> None:
    """Rewrite `path` without the lines of steps after `step` (and without a torn last line)."""
    from dino.io import atomic_write_text

    kept, changed = [], False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row_step = json.loads(line).get("step")
        except ValueError:  # a line cut short by a kill
            changed = True
            continue
        if isinstance(row_step, int) and row_step > step:
            changed = True
            continue
        kept.append(line)
    if changed:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
