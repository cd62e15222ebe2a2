"""Feature distillation: the student's [CLS] and patch tokens regressed onto a teacher's through a projection.

For users who want the teacher's features rather than its prototypes (lightly-train's "global + dense" targets).
With s ∈ R^{D_s} a student token, t ∈ R^{D_t} the teacher's token at the same place and the projection
p(s) = W s + b (W ∈ R^{D_t × D_s}, trained with the student):

    cosine:     ℓ(s, t) = 1 − ⟨p(s), t⟩ / (max(‖p(s)‖, ε) · max(‖t‖, ε))
    smooth_l1:  ℓ(s, t) = (1/D_t) Σ_d h_β(p(s)_d − t_d),   h_β(z) = z²/(2β) if |z| < β else |z| − β/2

    L = (1/B) Σ_b ℓ(s_cls_b, t_cls_b)  +  λ_patch · (1/(B·N)) Σ_{b,n} ℓ(s_patch_bn, t_patch_bn)

The teacher side carries no gradient. Student and teacher patch grids must have the same N tokens.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

FEATURE_LOSSES = ("cosine", "smooth_l1")


def _token_loss(projected: Tensor, target: Tensor, kind: str, beta: float, eps: float) -> Tensor:
    """ℓ per token (…,) for tokens (…, D_t)."""
    if kind == "cosine":
        return 1 - F.cosine_similarity(projected, target, dim=-1, eps=eps)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(projected, target, reduction="none", beta=beta).mean(-1)
    raise ValueError(f"unknown feature loss {kind!r}; choose from {FEATURE_LOSSES}")


def feature_distillation_loss(
    student_cls: Tensor,
    student_patches: Tensor | None,
    teacher_cls: Tensor,
    teacher_patches: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None = None,
    kind: str = "cosine",
    patch_weight: float = 1.0,
    beta: float = 1.0,
    eps: float = 1e-8,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L and its terms {'cls', 'patch'} (the formula in the module docstring).

    Shapes: student_cls (B, D_s), student_patches (B, N, D_s) or None, teacher_cls (B, D_t), teacher_patches
    (B, N, D_t) or None; weight (D_t, D_s), bias (D_t,) or None. Computed in fp32. `weight` None: the student
    tokens are projected already (p = identity; the training loop projects inside the student network).
    """
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"unknown feature loss {kind!r}; choose from {FEATURE_LOSSES}")

    def project(tokens: Tensor) -> Tensor:
        if weight is None:
            return tokens.float()
        return F.linear(tokens.float(), weight.float(), bias.float() if bias is not None else None)

    terms = {"cls": _token_loss(project(student_cls), teacher_cls.detach().float(), kind, beta, eps).mean()}
    total = terms["cls"]
    if student_patches is not None and teacher_patches is not None and patch_weight:
        if student_patches.shape[:2] != teacher_patches.shape[:2]:
            raise ValueError(
                f"student patches {tuple(student_patches.shape)} and teacher patches "
                f"{tuple(teacher_patches.shape)} differ in batch or token count"
            )
        projected = project(student_patches)
        terms["patch"] = _token_loss(projected, teacher_patches.detach().float(), kind, beta, eps).mean()
        total = total + patch_weight * terms["patch"]
    return total, terms
