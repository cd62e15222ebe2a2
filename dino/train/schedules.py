"""Per-iteration (or per-epoch) hyper-parameter schedules and learning-rate scaling rules.

Values are precomputed into numpy arrays, as in both official codes, so a schedule is a lookup.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from dino.errors import UserError, suggest

LR_SCALING_RULES = ("linear", "sqrt_wrt_1024", "none")


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
    freeze_iters: int = 0,
) -> np.ndarray:
    """[freeze zeros] + [linear warmup] + [cosine decay], `total_iters` values in all.

    * freeze: `freeze_iters` zeros (DINOv2's CosineScheduler; 0 in DINO v1);
    * warmup: ``linspace(start_warmup_value, base_value, warmup_iters)``, endpoint **included**, so the
      last warmup value is base_value; with no warmup, start_warmup_value is ignored;
    * cosine over L = total − warmup − freeze iterations, i = 0…L−1:
      ``final + ½(base − final)(1 + cos(π i / L))`` — it starts at base and never reaches final exactly.
    """
    if min(total_iters, warmup_iters, freeze_iters) < 0:
        raise ValueError("iteration counts must be non-negative")
    n_cosine = total_iters - warmup_iters - freeze_iters
    if n_cosine < 0:
        raise ValueError(
            f"warmup_iters ({warmup_iters}) + freeze_iters ({freeze_iters}) exceed total_iters ({total_iters})"
        )
    freeze = np.zeros(freeze_iters)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    steps = np.arange(n_cosine)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(n_cosine, 1)))
    return np.concatenate((freeze, warmup, cosine))


def warmup_cosine_hold(
    start: float, peak: float, end: float, warmup_iters: int, cosine_iters: int, total_iters: int
) -> np.ndarray:
    """DINOv3's "schedules v2" `{start, peak, end, warmup, cosine}`, `total_iters` values:

    * warm-up: ``linspace(start, peak, warmup_iters, endpoint=False)`` — it stops one step short of peak;
    * cosine from peak to end over `cosine_iters` steps with **both ends included**, i = 0…C−1:
      ``end + ½(peak − end)(1 + cos(π i / (C − 1)))`` (C = 1: just peak);
    * then `end`, held to `total_iters` (a schedule shorter than the run is padded, a longer one cut).
    """
    if min(warmup_iters, cosine_iters, total_iters) < 0:
        raise ValueError("iteration counts must be non-negative")
    warmup = np.linspace(start, peak, warmup_iters, endpoint=False)
    steps = np.arange(cosine_iters)
    cosine = end + 0.5 * (peak - end) * (1 + np.cos(np.pi * steps / max(cosine_iters - 1, 1)))
    held = np.full(max(total_iters - warmup_iters - cosine_iters, 0), float(end))
    return np.concatenate((warmup, cosine, held))[:total_iters]


def scale_for_batch_v3(value: float, global_batch: int, rule: str) -> float:
    """DINOv3's batch scaling of a schedule's peak and end (not its start): ``linear_wrt_256`` × B/256,
    ``sqrt_wrt_1024`` × 4·√(B/1024) (note the 4: not DINOv2's √(B/1024)), ``none`` unchanged; B = global batch."""
    if rule == "linear_wrt_256":
        return value * global_batch / 256.0
    if rule == "sqrt_wrt_1024":
        return value * 4.0 * math.sqrt(global_batch / 1024.0)
    if rule == "none":
        return value
    choices = ("linear_wrt_256", "sqrt_wrt_1024", "none")
    raise UserError(f"unknown scaling rule {rule!r}; choose one of {', '.join(choices)}.{suggest(rule, choices)}")


class Schedule:
    """A precomputed schedule; indices past its end give `final_value` (training may run longer)."""

    def __init__(self, values: np.ndarray | Sequence[float], final_value: float) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        self.final_value = float(final_value)

    @classmethod
    def cosine(
        cls,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ) -> "Schedule":
        """`cosine_schedule` wrapped as a Schedule whose past-the-end value is `final_value`."""
        values = cosine_schedule(base_value, final_value, total_iters, warmup_iters, start_warmup_value, freeze_iters)
        return cls(values, final_value)

    @classmethod
    def warmup_cosine_hold(
        cls, start: float, peak: float, end: float, warmup_iters: int, cosine_iters: int, total_iters: int
    ) -> "Schedule":
        """`warmup_cosine_hold` (DINOv3's schedules v2) as a Schedule whose past-the-end value is `end`."""
        return cls(warmup_cosine_hold(start, peak, end, warmup_iters, cosine_iters, total_iters), end)

    def __getitem__(self, index: int) -> float:
        if index < 0:
            raise IndexError(f"schedule index must be non-negative, got {index}")
        if index >= len(self.values):
            return self.final_value
        return float(self.values[index])

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        first = f"{self.values[0]:.4g}" if len(self.values) else "-"
        return f"Schedule(len={len(self.values)}, first={first}, final={self.final_value:.4g})"


def teacher_temp_schedule(
    warmup_teacher_temp: float,
    teacher_temp: float,
    warmup_epochs: int,
    total_epochs: int,
    iters_per_epoch: int = 1,
    per_iteration: bool = False,
) -> Schedule:
    """Teacher temperature: linear warmup (endpoint included), then constant `teacher_temp`.

    * ``per_iteration=False`` (DINO v1): one value per **epoch**,
      ``concat(linspace(warmup_temp, temp, warmup_epochs), temp…)``; index it with the epoch.
    * ``per_iteration=True`` (DINOv2): the warmup spans warmup_epochs · iters_per_epoch iterations;
      index it with the global iteration.
    A warmup longer than the run is kept whole (DINOv2 allows it); past the end the value is teacher_temp.
    """
    if min(warmup_epochs, total_epochs, iters_per_epoch) < 0:
        raise ValueError("epoch and iteration counts must be non-negative")
    steps_per_epoch = iters_per_epoch if per_iteration else 1
    warmup = np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs * steps_per_epoch)
    constant = np.full(max(total_epochs - warmup_epochs, 0) * steps_per_epoch, float(teacher_temp))
    return Schedule(np.concatenate((warmup, constant)), teacher_temp)


def momentum_schedule(base_momentum: float, total_iters: int, final_momentum: float = 1.0) -> Schedule:
    """Teacher EMA momentum: cosine from `base_momentum` (0.996 v1, 0.992 DINOv2) towards 1, per iteration."""
    return Schedule.cosine(base_momentum, final_momentum, total_iters)


def last_layer_lr_schedule(lr: Schedule, freeze_iters: int) -> Schedule:
    """DINOv2's freeze of the head's last layer: a copy of the lr schedule with its first iterations at 0."""
    values = lr.values.copy()
    values[:freeze_iters] = 0.0
    return Schedule(values, lr.final_value)


def scale_lr(base_lr: float, total_batch_size: int, rule: str) -> float:
    """Scale a reference learning rate to the global batch size.

    * ``linear`` (DINO v1, Goyal et al.): lr · batch / 256;
    * ``sqrt_wrt_1024`` (DINOv2): lr · sqrt(batch / 1024);
    * ``none``: lr unchanged.
    """
    if rule == "linear":
        return base_lr * total_batch_size / 256.0
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(total_batch_size / 1024.0)
    if rule == "none":
        return base_lr
    choices = ", ".join(LR_SCALING_RULES)
    raise UserError(f"unknown lr scaling rule {rule!r}; choose one of {choices}.{suggest(rule, LR_SCALING_RULES)}")
