"""Self-distillation losses: maths on tensors only (no model or training-loop imports)."""

from dino.losses.centering import Centering, sinkhorn_knopp, softmax_center
from dino.losses.dino_clstoken_loss import CLSTokenLossTerms, DINOLoss, dino_v1_loss, dinov2_clstoken_loss_terms
from dino.losses.feature_distillation import FEATURE_LOSSES, feature_distillation_loss
from dino.losses.gram_loss import gram_loss, gram_matrix, resize_patch_tokens
from dino.losses.ibot_patch_loss import iBOTPatchLoss, masked_patch_weights
from dino.losses.koleo_loss import KoLeoLoss, koleo_loss, nearest_neighbour_indices
from dino.losses.soft_cross_entropy import soft_cross_entropy

__all__ = [
    "Centering",
    "sinkhorn_knopp",
    "softmax_center",
    "CLSTokenLossTerms",
    "DINOLoss",
    "dino_v1_loss",
    "dinov2_clstoken_loss_terms",
    "FEATURE_LOSSES",
    "feature_distillation_loss",
    "gram_loss",
    "gram_matrix",
    "resize_patch_tokens",
    "iBOTPatchLoss",
    "masked_patch_weights",
    "KoLeoLoss",
    "koleo_loss",
    "nearest_neighbour_indices",
    "soft_cross_entropy",
]
