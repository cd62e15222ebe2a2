"""Gram anchoring (DINOv3, Siméoni et al. 2025, §4): keep the patch-to-patch similarity structure of a frozen
"Gram teacher" while the student keeps training, so dense features do not degrade over long schedules.

With X̂ the row-wise L2-normalised patch tokens (computed in fp32), the Gram matrix is G = X̂·X̂ᵀ (cosine
similarities between patches) and

    L_Gram = mean over the entries of (G_student − G_teacher)²       (‖·‖²_F / number of entries)

- image level: one N×N Gram per image (patches of the same image only), the mean taken over all B·N² entries;
- batch level: one Gram over all B·N patch tokens of the batch (patches of different images too), optionally over
  a subset of tokens (`token_mask`: the iBOT-masked or the unmasked ones);
- `remove_negative`: negative similarities are set to 0 in both Grams before the difference (only the positive
  structure is anchored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gram_matrix(
    tokens: Tensor, image_level: bool = True, token_mask: Tensor | None = None, remove_negative: bool = False
) -> Tensor:
    """Cosine-similarity Gram of (B, N, D) patch tokens: (B, N, N) image level, (M, M) batch level."""
    normed = F.normalize(tokens.float(), dim=-1)
    if image_level:
        if token_mask is not None:
            raise ValueError("token_mask selects tokens across the batch: use it with image_level=False")
        gram = normed @ normed.transpose(-1, -2)
    else:
        flat = normed.reshape(-1, normed.shape[-1]) if token_mask is None else normed[token_mask]
        gram = flat @ flat.T
    return gram.clamp_min(0.0) if remove_negative else gram


def gram_loss(
    student_tokens: Tensor,
    teacher_tokens: Tensor,
    image_level: bool = True,
    token_mask: Tensor | None = None,
    remove_negative: bool = False,
) -> Tensor:
    """L_Gram between student and Gram-teacher patch tokens, both (B, N, D) on the same patch grid (see module)."""
    if student_tokens.shape[:2] != teacher_tokens.shape[:2]:
        raise ValueError(
            f"student and Gram teacher tokens must cover the same patches: {tuple(student_tokens.shape)} "
            f"vs {tuple(teacher_tokens.shape)} (resize the teacher's map with resize_patch_tokens)"
        )
    with torch.no_grad():
        target = gram_matrix(teacher_tokens, image_level, token_mask, remove_negative)
    return F.mse_loss(gram_matrix(student_tokens, image_level, token_mask, remove_negative), target)


def resize_patch_tokens(tokens: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """(B, h·w, D) tokens on an h×w grid → (B, H·W, D) on H×W: bicubic, align_corners False, no antialias
    (how DINOv3 brings a higher-resolution Gram teacher's patch map onto the student's grid)."""
    batch, count, dim = tokens.shape
    if count != grid[0] * grid[1]:
        raise ValueError(f"{count} tokens do not form a {grid[0]}×{grid[1]} grid")
    maps = tokens.transpose(1, 2).reshape(batch, dim, *grid)
    resized = F.interpolate(maps.float(), size=size, mode="bicubic", align_corners=False, antialias=False)
    return resized.flatten(2).transpose(1, 2).to(tokens.dtype)
