"""Gram anchoring loss against a pair-by-pair computation written out in the test."""

import math

import pytest
import torch
import torch.nn.functional as F

from dino.losses.gram_loss import gram_loss, resize_patch_tokens


def pairwise_reference(student, teacher, image_level, remove_negative, mask=None):
    """Σ over token pairs of (cos_s − cos_t)² / number of pairs, one pair at a time."""
    B, N, _ = student.shape
    if image_level:
        pairs = [((b, i), (b, j)) for b in range(B) for i in range(N) for j in range(N)]
    else:
        tokens = [(b, i) for b in range(B) for i in range(N) if mask is None or bool(mask[b, i])]
        pairs = [(p, q) for p in tokens for q in tokens]
    total = 0.0
    for (b1, i), (b2, j) in pairs:
        cs = float(F.cosine_similarity(student[b1, i].double(), student[b2, j].double(), dim=0))
        ct = float(F.cosine_similarity(teacher[b1, i].double(), teacher[b2, j].double(), dim=0))
        if remove_negative:
            cs, ct = max(cs, 0.0), max(ct, 0.0)
        total += (cs - ct) ** 2
    return total / len(pairs)


@pytest.mark.parametrize("image_level", [True, False])
@pytest.mark.parametrize("remove_negative", [False, True])
def test_gram_loss_equals_the_pairwise_definition(image_level, remove_negative):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    expected = pairwise_reference(student, teacher, image_level, remove_negative)
    got = gram_loss(student, teacher, image_level=image_level, remove_negative=remove_negative)
    assert math.isclose(float(got), expected, rel_tol=1e-5)


def test_batch_level_over_masked_tokens_and_gradients_reach_the_student_only():
    torch.manual_seed(1)
    student = torch.randn(2, 6, 4, requires_grad=True)
    teacher = torch.randn(2, 6, 4, requires_grad=True)
    mask = torch.rand(2, 6) > 0.4
    got = gram_loss(student, teacher, image_level=False, token_mask=mask)
    assert math.isclose(
        float(got), pairwise_reference(student.detach(), teacher.detach(), False, False, mask), rel_tol=1e-5
    )
    got.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None
    assert float(gram_loss(teacher.detach(), teacher.detach())) == 0.0
    with pytest.raises(ValueError, match="image_level=False"):
        gram_loss(student, teacher, image_level=True, token_mask=mask)


def test_resize_patch_tokens_matches_interpolating_the_feature_map():
    torch.manual_seed(2)
    tokens = torch.randn(2, 4 * 6, 3)
    resized = resize_patch_tokens(tokens, (4, 6), (2, 3))
    maps = tokens.reshape(2, 4, 6, 3).permute(0, 3, 1, 2)
    expected = (
        F.interpolate(maps, size=(2, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(2, 6, 3)
    )
    torch.testing.assert_close(resized, expected)
    same = resize_patch_tokens(tokens, (4, 6), (4, 6))
    torch.testing.assert_close(same, tokens)  # the identity on its own grid
    with pytest.raises(ValueError, match="5×5 grid"):
        resize_patch_tokens(tokens, (5, 5), (2, 2))
