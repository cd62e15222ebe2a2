"""iBOT masked-patch loss (Zhou et al. 2022, "masked image modelling with an online tokenizer"), DINOv2 form.

The student sees a global crop with some patch embeddings replaced by the mask token; the teacher sees the
unmasked crop. Only the M masked patches (over the whole local batch, flattened) enter the loss::

    L = −Σ_i w_i Σ_k t_ik · log_softmax(s_i / τ)_k / n_images

with w_i = 1 / (number of masked patches in patch i's image), so every masked image weighs the same
whatever its mask size, and n_images the number of global-crop images (masked or not).

Teacher targets: `iBOTPatchLoss.softmax_center_teacher` (center = EMA of the mean over masked patches) or
`iBOTPatchLoss.sinkhorn_knopp_teacher` (B = total masked patches over all ranks).
"""

from __future__ import annotations

import torch

from dino.distributed import all_reduce_sum
from dino.losses.centering import Centering, sinkhorn_knopp
from dino.losses.soft_cross_entropy import soft_cross_entropy


def masked_patch_weights(masks: torch.Tensor) -> torch.Tensor:
    """Per-masked-patch weights w_i = 1 / (#masked patches of its image), in ``masks[masks]`` order.

    `masks` is (n_images, n_patches) boolean; the result is (M,) with M = masks.sum().
    """
    masks = masks.flatten(1).bool()
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1.0)
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


class iBOTPatchLoss(Centering):  # noqa: N801 - the paper's spelling, as in the official code
    """iBOT patch loss with its own teacher center (state_dict key ``center``, shape (1, 1, K)).

    The center's batch statistic is the **mean over the masked patches** of each rank (then averaged over
    ranks), not a mean over every patch row.
    """

    def __init__(
        self,
        patch_out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        deferred_center_update: bool = True,
    ) -> None:
        super().__init__(patch_out_dim, center_momentum, deferred_center_update, center_shape=(1, 1, patch_out_dim))
        self.student_temp = student_temp

    @torch.no_grad()
    def update_center(self, teacher_patch_logits_masked: torch.Tensor) -> None:
        """Record the teacher logits of the masked patches: (M, K), or (G, M, K) with one mean per group."""
        logits = teacher_patch_logits_masked.detach().float()
        if logits.dim() == 2:
            logits = logits.unsqueeze(0)
        if logits.shape[1] == 0:
            # No masked patch on this rank: contribute nothing (the mean of nothing would be NaN).
            self._record_batch(logits.new_zeros(self.dim), 0)
            return
        self._record_batch(torch.sum(logits.mean(dim=1), dim=0), logits.shape[0])

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_patch_logits: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: torch.Tensor | int,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets (M, K) for the local masked patches; B = masked patches over all ranks.

        `n_masked_patches_tensor` is this rank's count; it is summed over ranks on a copy (not in place).
        """
        total = torch.as_tensor(n_masked_patches_tensor, device=teacher_patch_logits.device).clone()
        return sinkhorn_knopp(teacher_patch_logits, teacher_temp, n_iterations, total_batch=all_reduce_sum(total))

    def forward_masked(
        self,
        student_patch_logits_masked: torch.Tensor,
        teacher_patch_probs_masked: torch.Tensor,
        masks_weight: torch.Tensor,
        n_images: int,
    ) -> torch.Tensor:
        """−Σ_i w_i Σ_k t_ik · log_softmax(s_i / τ)_k / n_images over the M masked patches.

        Args:
            student_patch_logits_masked: (M, K) student head outputs at the masked positions.
            teacher_patch_probs_masked: (M, K) teacher targets at the same positions.
            masks_weight: (M,) per-patch weights, see `masked_patch_weights`.
            n_images: number of global-crop images, including those without any masked patch.
        """
        # per-patch cross-entropy without (M, K) temporaries: M·K is ~40 M values per step at K = 65,536
        per_patch = soft_cross_entropy(student_patch_logits_masked, teacher_patch_probs_masked, self.student_temp)
        return (per_patch * masks_weight).sum() / n_images
