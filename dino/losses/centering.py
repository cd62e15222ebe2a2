"""Teacher post-processing: softmax centering (DINO) and Sinkhorn-Knopp (SwAV-style, DINOv2 L/g configs).

Both turn raw teacher logits (B, K) into target probabilities (B, K) whose rows sum to 1.

* **Centering** (DINO, Caron et al. 2021, "centering and sharpening"):
  ``p = softmax((t - c) / T)`` with the center ``c`` an exponential moving average of the batch mean of the
  teacher logits, ``c <- m·c + (1 - m)·mean_batch(t)``, mean taken over all ranks.
  DINO v1 applies the EMA right after the loss ("immediate"). DINOv2 *defers* it: `update_center` only
  stores the all-reduced batch sum, and the EMA is applied the next time the center is used. Both give the
  same sequence of centers; the deferred form lets the official code overlap the all-reduce with compute.

* **Sinkhorn-Knopp** (Cuturi 2013; SwAV, Caron et al. 2020, "equipartition" / "optimal transport"):
  a few alternating row/column normalisations of ``exp(t / T)`` so that prototypes are used equally over
  the global batch and each sample's target is a distribution.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dino.distributed import all_reduce_sum, get_world_size


def softmax_center(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Centred and sharpened teacher targets: ``softmax((t - c) / T)`` over the last dimension.

    `center` broadcasts against `teacher_logits` (shape (K,) or (1, K)); the result follows type promotion,
    so bf16/fp16 logits with an fp32 center give fp32 probabilities (as in the official code).
    """
    return F.softmax((teacher_logits - center) / teacher_temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    total_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sinkhorn-Knopp targets (SwAV "equipartition"), computed in fp32, distributed over ranks.

    With local logits t (B_local, K), prototypes K and global batch B (``total_batch``; default
    ``B_local · world_size``)::

        Q = exp(t / T)ᵀ                      # (K, B_local); no max-subtraction, as in the official code
        Q /= Σ_all-ranks Q                   # one global normalisation
        repeat n_iterations:
            Q /= rowsum(Q) (all-reduced); Q /= K     # every prototype gets mass 1/K over the global batch
            Q /= colsum(Q) (local);       Q /= B     # every sample gets mass 1/B
        return (Q · B)ᵀ                      # (B_local, K); each row sums to 1

    Rows are all-reduced because a prototype's usage is counted over the whole global batch; columns are
    samples, which live on one rank only. For iBOT, ``total_batch`` is the global number of masked patches.
    """
    q = torch.exp(teacher_logits.float() / teacher_temp).t()
    n_prototypes = q.shape[0]
    if total_batch is None:
        total_batch = q.shape[1] * get_world_size()

    q /= all_reduce_sum(torch.sum(q))
    for _ in range(n_iterations):
        q /= all_reduce_sum(torch.sum(q, dim=1, keepdim=True))
        q /= n_prototypes
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= total_batch
    q *= total_batch
    return q.t()


class Centering(nn.Module):
    """Holds the teacher center ``c`` (a persistent buffer, so it is saved and resumed) and its EMA.

    ``update_center(t)`` records the batch: Σ_b t_b and the row count, summed over all ranks in one
    all-reduce. The EMA ``c <- m·c + (1 - m)·Σt / (N·world)`` is then

    * ``deferred_update=True`` (DINOv2): applied at the next `softmax_center_teacher` /
      `apply_center_update` call (or before `state_dict()`, so a checkpoint holds the center the next step
      would use and resuming is exact);
    * ``deferred_update=False`` (DINO v1): applied immediately.

    Calling `update_center` twice without using the center applies the first pending update before
    recording the second: every call is exactly one EMA step.
    If no rank contributed any row (empty batch), the center is left unchanged rather than becoming NaN.
    """

    center: torch.Tensor

    def __init__(
        self,
        dim: int,
        momentum: float = 0.9,
        deferred_update: bool = True,
        center_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        shape = center_shape if center_shape is not None else (1, dim)
        if shape[-1] != dim or int(torch.Size(shape).numel()) != dim:
            raise ValueError(f"center_shape {shape} must hold exactly {dim} values in its last dimension")
        self.dim = dim
        self.center_momentum = momentum
        self.deferred_update = deferred_update
        self.register_buffer("center", torch.zeros(shape), persistent=True)
        # All-reduced [Σ rows (dim values), row count] waiting to be folded into the center.
        self._pending_statistics: torch.Tensor | None = None
        self.register_state_dict_pre_hook(_apply_pending_before_state_dict)

    @property
    def has_pending_update(self) -> bool:
        return self._pending_statistics is not None

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """Record the teacher logits (..., K) of this step (every leading index is one row of the mean)."""
        rows = teacher_logits.detach().reshape(-1, self.dim).float()
        self._record_batch(torch.sum(rows, dim=0), rows.shape[0])

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold a pending (deferred) batch into the center; a no-op when nothing is pending."""
        if self._pending_statistics is None:
            return
        statistics, self._pending_statistics = self._pending_statistics, None
        self._apply_ema(statistics)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Apply any pending EMA, then return ``softmax((t - c) / T)`` with the shape of `teacher_logits`."""
        self.apply_center_update()
        return softmax_center(teacher_logits, self.center.reshape(self.dim), teacher_temp)

    def _record_batch(self, batch_sum: torch.Tensor, n_rows: int) -> None:
        """All-reduce [Σ rows, count] in one collective; apply now or keep for later."""
        statistics = torch.cat([batch_sum.reshape(self.dim), batch_sum.new_tensor([float(n_rows)])])
        all_reduce_sum(statistics)
        if not self.deferred_update:
            self._apply_ema(statistics)
            return
        self.apply_center_update()
        self._pending_statistics = statistics

    def _apply_ema(self, statistics: torch.Tensor) -> None:
        batch_sum, n_rows = statistics[:-1], statistics[-1]
        batch_mean = (batch_sum / n_rows.clamp(min=1.0)).reshape(self.center.shape).to(self.center.dtype)
        updated = self.center * self.center_momentum + batch_mean * (1 - self.center_momentum)
        # torch.where keeps the step free of a host sync; an empty global batch leaves the center as is.
        self.center.copy_(torch.where(n_rows > 0, updated, self.center))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A batch recorded before loading belongs to another run: the loaded center replaces it.
        self._pending_statistics = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        mode = "deferred" if self.deferred_update else "immediate"
        return f"dim={self.dim}, momentum={self.center_momentum}, update={mode}"


def _apply_pending_before_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    if isinstance(module, Centering):
        module.apply_center_update()
