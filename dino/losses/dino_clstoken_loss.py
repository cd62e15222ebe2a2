"""DINO [CLS]-token loss: cross-entropy between teacher targets and student predictions over crop pairs.

Per pair of (student crop s, teacher crop t), with student temperature τ (0.1)::

    H(t, s) = -mean_b Σ_k t_bk · log_softmax(s_b / τ)_k        ("cross-entropy", DINO eq. 1)

The teacher targets come from `DINOLoss.softmax_center_teacher` (centering + sharpening) or
`DINOLoss.sinkhorn_knopp_teacher`; the teacher sees only the 2 global crops, the student all crops.

How to combine the pieces for each recipe (both average H over the same pairs: teacher global crop i,
student crop j ≠ i, i.e. 2·(n_crops − 1) = 2·1 + 2·n_local pairs):

**DINOv2** (``ssl_meta_arch``; center update deferred)::

    loss = DINOLoss(K)                                  # deferred_center_update=True
    probs = loss.softmax_center_teacher(teacher_global_logits, T)   # or loss.sinkhorn_knopp_teacher(...)
    loss.update_center(teacher_global_logits)           # only with centering; applied at the next use
    terms = dinov2_clstoken_loss_terms(loss, student_global_logits, probs, student_local_logits, n_local)
    total = dino_weight * (terms.global_crops + terms.local_crops)

`DINOLoss.forward` itself is the un-normalised Σ_s Σ_t H(t, s) of the official code; the helper pairs
each student global crop with the *other* teacher crop (global term ×2, since the two globals are one
batched term whose batch mean halves it) and divides both terms by 2·1 + 2·n_local.

**DINO v1** (``main_dino.py``; center updated immediately after the loss)::

    loss = DINOLoss(K, deferred_center_update=False)
    probs = loss.softmax_center_teacher(teacher_logits, teacher_temp_by_epoch[epoch])
    value = dino_v1_loss(student_logits, probs, n_crops)   # mean over the pairs v ≠ iq
    loss.update_center(teacher_logits)
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from dino.losses.centering import Centering, sinkhorn_knopp


class DINOLoss(Centering):
    """DINO [CLS] loss with its teacher center (state_dict key ``center``, shape (1, K), as in both official
    checkpoints).

    ``forward(students, teachers) = Σ_s Σ_t −mean_b Σ_k t · log_softmax(s / τ)`` — summed, **not** averaged
    over the pairs (DINOv2 convention; see the module docstring for the normalisation).
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        deferred_center_update: bool = True,
    ) -> None:
        super().__init__(out_dim, center_momentum, deferred_center_update, center_shape=(1, out_dim))
        self.student_temp = student_temp

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets (B, K) over the global batch B = B_local · world_size (fp32)."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    def forward(
        self, student_logits_list: Sequence[torch.Tensor], teacher_probs_list: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Σ over every (student, teacher) pair of the batch-mean cross-entropy (shapes (B, K) each)."""
        total_loss: torch.Tensor | float = 0.0
        for student_logits in student_logits_list:
            log_probs = F.log_softmax(student_logits / self.student_temp, dim=-1)
            for teacher_probs in teacher_probs_list:
                total_loss = total_loss - torch.sum(teacher_probs * log_probs, dim=-1).mean()
        if not isinstance(total_loss, torch.Tensor):
            raise ValueError("DINOLoss needs at least one student and one teacher tensor")
        return total_loss


class CLSTokenLossTerms(NamedTuple):
    """The two DINOv2 [CLS] loss terms, each already divided by the number of pairs (their sum is the mean)."""

    global_crops: torch.Tensor
    local_crops: torch.Tensor


def dinov2_clstoken_loss_terms(
    dino_loss: DINOLoss,
    student_global_logits: torch.Tensor,
    teacher_global_probs: torch.Tensor,
    student_local_logits: torch.Tensor | None,
    n_local_crops: int,
) -> CLSTokenLossTerms:
    """DINOv2's global and local [CLS] loss terms, normalised by the number of pairs 2·1 + 2·n_local.

    Args:
        student_global_logits: (2B, K), global crop 1 then global crop 2.
        teacher_global_probs: (2B, K) teacher targets in the **same** order (crop 1 then crop 2).
        student_local_logits: (n_local·B, K), local crops one after another; None when n_local is 0.

    global = 2 · mean_{2B} H(teacher of the *other* global crop, student global) / (2 + 2·n_local)
           = (H(t₂, s₁) + H(t₁, s₂)) / (2 + 2·n_local)
    local  = Σ_{local ℓ} Σ_{teacher i} H(t_i, s_ℓ) / (2 + 2·n_local)
    """
    if student_global_logits.shape != teacher_global_probs.shape or student_global_logits.shape[0] % 2:
        raise ValueError(
            "student_global_logits and teacher_global_probs must both be (2B, K); got "
            f"{tuple(student_global_logits.shape)} and {tuple(teacher_global_probs.shape)}"
        )
    n_loss_terms = 2 * 1 + 2 * n_local_crops
    teacher_crop1, teacher_crop2 = teacher_global_probs.chunk(2)
    # Same order as the official code, which swaps the teacher crops before computing the targets.
    teachers_swapped = [teacher_crop2, teacher_crop1]

    global_loss = dino_loss([student_global_logits], [torch.cat(teachers_swapped)]) * 2 / n_loss_terms

    if n_local_crops == 0:
        return CLSTokenLossTerms(global_loss, global_loss.new_zeros(()))
    batch = teacher_crop1.shape[0]
    if student_local_logits is None or student_local_logits.shape[0] != n_local_crops * batch:
        shape = None if student_local_logits is None else tuple(student_local_logits.shape)
        raise ValueError(
            f"student_local_logits must be ({n_local_crops}·{batch}, K) for {n_local_crops} local crops; got {shape}"
        )
    local_loss = dino_loss(list(student_local_logits.chunk(n_local_crops)), teachers_swapped) / n_loss_terms
    return CLSTokenLossTerms(global_loss, local_loss)


def dino_v1_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    n_crops: int,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """DINO v1 loss: mean over the pairs (teacher global crop iq, student crop v ≠ iq) of H(t_iq, s_v).

    Args:
        student_logits: (n_crops·B, K), crops in the order global 1, global 2, locals…
        teacher_probs: (2·B, K) centred and sharpened teacher targets of global 1, global 2.
    With 2 global and 8 local crops there are 2·10 − 2 = 18 pairs.
    """
    n_teacher_crops = 2
    if student_logits.shape[0] % n_crops or teacher_probs.shape[0] % n_teacher_crops:
        raise ValueError(
            f"batch sizes {student_logits.shape[0]} / {teacher_probs.shape[0]} are not multiples of {n_crops} / 2 crops"
        )
    if student_logits.shape[0] // n_crops != teacher_probs.shape[0] // n_teacher_crops:
        raise ValueError("student and teacher crops must have the same per-crop batch size")
    student_log_probs = [F.log_softmax(chunk, dim=-1) for chunk in (student_logits / student_temp).chunk(n_crops)]

    total_loss: torch.Tensor | float = 0.0
    n_pairs = 0
    for teacher_crop, teacher_chunk in enumerate(teacher_probs.chunk(n_teacher_crops)):
        for student_crop, log_probs in enumerate(student_log_probs):
            if student_crop == teacher_crop:
                continue  # the same view seen by both networks carries no signal
            total_loss = total_loss + torch.sum(-teacher_chunk * log_probs, dim=-1).mean()
            n_pairs += 1
    if n_pairs == 0:
        raise ValueError("dino_v1_loss needs at least 2 crops")
    return total_loss / n_pairs
