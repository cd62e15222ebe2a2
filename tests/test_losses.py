"""Losses against independent computations (numpy / explicit loops / hand-computed values)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dino.losses import (
    Centering,
    DINOLoss,
    KoLeoLoss,
    dino_v1_loss,
    dinov2_clstoken_loss_terms,
    iBOTPatchLoss,
    koleo_loss,
    masked_patch_weights,
    sinkhorn_knopp,
    softmax_center,
)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def cross_entropy(teacher: np.ndarray, student_logits: np.ndarray, temp: float = 0.1) -> float:
    """H(t, s) = −mean_b Σ_k t·log_softmax(s/τ), with explicit loops over the batch."""
    log_probs = np_log_softmax(student_logits / temp)
    per_sample = [
        -sum(teacher[b, k] * log_probs[b, k] for k in range(teacher.shape[1])) for b in range(teacher.shape[0])
    ]
    return float(np.mean(per_sample))


def np_sinkhorn(logits: np.ndarray, temp: float, n_iterations: int) -> np.ndarray:
    q = np.exp(logits.astype(np.float64) / temp).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ---------------------------------------------------------------- centering / Sinkhorn-Knopp


def test_softmax_center_matches_numpy(rng):
    t, c = rng.normal(size=(4, 6)), rng.normal(size=(1, 6))
    out = softmax_center(torch.tensor(t), torch.tensor(c), 0.04)
    np.testing.assert_allclose(out.numpy(), np_softmax((t - c) / 0.04), rtol=1e-10)


def test_sinkhorn_three_iterations_matches_numpy_and_rows_sum_to_one(rng):
    logits = rng.normal(scale=0.5, size=(5, 7))
    out = sinkhorn_knopp(torch.tensor(logits, dtype=torch.float16), teacher_temp=0.1)
    assert out.dtype == torch.float32 and out.shape == (5, 7)
    expected = np_sinkhorn(logits.astype(np.float16).astype(np.float64), 0.1, 3)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(out.sum(dim=1).numpy(), np.ones(5), rtol=1e-5)


def test_sinkhorn_converges_to_equipartition(rng):
    batch, prototypes = 6, 3
    logits = torch.tensor(rng.normal(scale=0.3, size=(batch, prototypes)), dtype=torch.float32)
    few = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=1)
    many = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=200)
    target = np.full(prototypes, batch / prototypes)
    np.testing.assert_allclose(many.sum(dim=0).numpy(), target, rtol=1e-4)
    np.testing.assert_allclose(many.sum(dim=1).numpy(), np.ones(batch), rtol=1e-5)
    # One iteration is not yet balanced: the test would catch a no-op column normalisation.
    assert np.abs(few.sum(dim=0).numpy() - target).max() > 1e-3


def test_sinkhorn_total_batch_only_rescales_intermediates(rng):
    logits = torch.tensor(rng.normal(size=(4, 5)), dtype=torch.float32)
    # B divides every column and the next row normalisation / the final ·B undo it: rows still sum to 1.
    local = sinkhorn_knopp(logits, 0.2, total_batch=4)
    global_b = sinkhorn_knopp(logits, 0.2, total_batch=torch.tensor(8))
    np.testing.assert_allclose(global_b.numpy(), local.numpy(), rtol=1e-5)


def test_deferred_center_changes_only_at_next_use(rng):
    centering = Centering(dim=4, momentum=0.9)
    batch1, batch2 = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    centering.update_center(torch.tensor(batch1, dtype=torch.float32))
    assert centering.has_pending_update
    np.testing.assert_array_equal(centering.center.numpy(), np.zeros((1, 4)))

    probe = rng.normal(size=(2, 4))
    out = centering.softmax_center_teacher(torch.tensor(probe, dtype=torch.float32), 0.5)
    expected_center = 0.1 * batch1.mean(axis=0, keepdims=True)
    np.testing.assert_allclose(centering.center.numpy(), expected_center, rtol=1e-5)
    np.testing.assert_allclose(out.numpy(), np_softmax((probe - expected_center) / 0.5), rtol=1e-5)
    assert not centering.has_pending_update

    # Two updates without a use in between are two EMA steps.
    centering.update_center(torch.tensor(batch2, dtype=torch.float32))
    centering.update_center(torch.tensor(batch1, dtype=torch.float32))
    centering.apply_center_update()
    expected_center = 0.9 * expected_center + 0.1 * batch2.mean(axis=0, keepdims=True)
    expected_center = 0.9 * expected_center + 0.1 * batch1.mean(axis=0, keepdims=True)
    np.testing.assert_allclose(centering.center.numpy(), expected_center, rtol=1e-5)


def test_immediate_center_update_is_dino_v1(rng):
    centering = Centering(dim=3, momentum=0.9, deferred_update=False)
    batch = rng.normal(size=(4, 3))
    centering.update_center(torch.tensor(batch, dtype=torch.float32))
    assert not centering.has_pending_update
    np.testing.assert_allclose(centering.center.numpy(), 0.1 * batch.mean(axis=0, keepdims=True), rtol=1e-5)


def test_center_state_dict_holds_pending_update_and_load_drops_stale_one(rng):
    loss = DINOLoss(out_dim=3)
    batch = torch.tensor(rng.normal(size=(2, 3)), dtype=torch.float32)
    loss.update_center(batch)
    state = loss.state_dict()
    assert list(state) == ["center"]
    np.testing.assert_allclose(state["center"].numpy(), 0.1 * batch.numpy().mean(axis=0, keepdims=True), rtol=1e-5)

    resumed = DINOLoss(out_dim=3)
    resumed.update_center(torch.ones(2, 3))  # recorded before loading: must not leak into the resumed run
    resumed.load_state_dict(state)
    probe = torch.zeros(1, 3)
    torch.testing.assert_close(resumed.softmax_center_teacher(probe, 0.1), loss.softmax_center_teacher(probe, 0.1))


def test_empty_batch_leaves_center_unchanged():
    ibot = iBOTPatchLoss(patch_out_dim=3)
    ibot.update_center(torch.empty(0, 3))
    ibot.apply_center_update()
    assert torch.isfinite(ibot.center).all() and ibot.center.abs().sum() == 0


# ---------------------------------------------------------------- DINO [CLS] loss


def test_dino_loss_forward_is_unnormalised_sum_over_pairs(rng):
    students = [rng.normal(size=(3, 5)) for _ in range(2)]
    teachers = [np_softmax(rng.normal(size=(3, 5))) for _ in range(3)]
    loss = DINOLoss(out_dim=5, student_temp=0.1)
    value = loss([torch.tensor(s) for s in students], [torch.tensor(t) for t in teachers])
    expected = sum(cross_entropy(t, s) for s in students for t in teachers)
    assert value.item() == pytest.approx(expected, rel=1e-9)


def test_dino_v1_loss_matches_double_loop(rng):
    batch, k, n_crops = 3, 4, 4
    student = rng.normal(size=(n_crops * batch, k))
    teacher = np_softmax(rng.normal(size=(2 * batch, k)))
    value = dino_v1_loss(torch.tensor(student), torch.tensor(teacher), n_crops=n_crops)

    terms = []
    for iq in range(2):
        for v in range(n_crops):
            if v != iq:
                terms.append(
                    cross_entropy(teacher[iq * batch : (iq + 1) * batch], student[v * batch : (v + 1) * batch])
                )
    assert len(terms) == 2 * n_crops - 2
    assert value.item() == pytest.approx(sum(terms) / len(terms), rel=1e-9)


def test_dinov2_terms_pair_each_global_with_the_other_teacher(rng):
    batch, k, n_local = 2, 5, 3
    student_global = rng.normal(size=(2 * batch, k))
    student_local = rng.normal(size=(n_local * batch, k))
    teacher = np_softmax(rng.normal(size=(2 * batch, k)))
    loss = DINOLoss(out_dim=k)
    terms = dinov2_clstoken_loss_terms(
        loss, torch.tensor(student_global), torch.tensor(teacher), torch.tensor(student_local), n_local
    )
    s1, s2 = student_global[:batch], student_global[batch:]
    t1, t2 = teacher[:batch], teacher[batch:]
    n_terms = 2 * 1 + 2 * n_local
    expected_global = (cross_entropy(t2, s1) + cross_entropy(t1, s2)) / n_terms
    expected_local = (
        sum(cross_entropy(t, student_local[i * batch : (i + 1) * batch]) for i in range(n_local) for t in (t1, t2))
        / n_terms
    )
    assert terms.global_crops.item() == pytest.approx(expected_global, rel=1e-9)
    assert terms.local_crops.item() == pytest.approx(expected_local, rel=1e-9)
    # Same pairs as DINO v1, hence the same mean when the crops are ordered globals then locals.
    v1 = dino_v1_loss(torch.tensor(np.concatenate([student_global, student_local])), torch.tensor(teacher), 2 + n_local)
    assert (terms.global_crops + terms.local_crops).item() == pytest.approx(v1.item(), rel=1e-9)


def test_dinov2_terms_without_local_crops(rng):
    student_global = torch.tensor(rng.normal(size=(4, 3)))
    teacher = torch.tensor(np_softmax(rng.normal(size=(4, 3))))
    terms = dinov2_clstoken_loss_terms(DINOLoss(3), student_global, teacher, None, 0)
    assert terms.local_crops.item() == 0.0
    expected = (
        cross_entropy(teacher[2:].numpy(), student_global[:2].numpy())
        + cross_entropy(teacher[:2].numpy(), student_global[2:].numpy())
    ) / 2
    assert terms.global_crops.item() == pytest.approx(expected, rel=1e-9)


def test_dinov2_terms_reject_wrong_local_batch(rng):
    with pytest.raises(ValueError):
        dinov2_clstoken_loss_terms(DINOLoss(3), torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(5, 3), 2)


def test_loss_gradient_flows_to_student_only(rng):
    student = torch.tensor(rng.normal(size=(4, 3)), requires_grad=True)
    teacher_logits = torch.tensor(rng.normal(size=(4, 3)), requires_grad=True)
    loss = DINOLoss(3)
    probs = loss.softmax_center_teacher(teacher_logits, 0.04)
    loss([student], [probs]).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher_logits.grad is None


# ---------------------------------------------------------------- iBOT


def test_masked_patch_weights_and_forward_masked_match_loops(rng):
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)  # 3 images, one unmasked
    weights = masked_patch_weights(masks)
    np.testing.assert_allclose(weights.numpy(), [0.5, 0.5, 1 / 3, 1 / 3, 1 / 3])

    n_masked, k = int(masks.sum()), 4
    student, teacher = rng.normal(size=(n_masked, k)), np_softmax(rng.normal(size=(n_masked, k)))
    value = iBOTPatchLoss(k).forward_masked(torch.tensor(student), torch.tensor(teacher), weights.double(), n_images=3)

    log_probs = np_log_softmax(student / 0.1)
    image_of_patch = [0, 0, 2, 2, 2]
    patches_in_image = {0: 2, 2: 3}
    total = 0.0
    for i in range(n_masked):
        ce = -sum(teacher[i, j] * log_probs[i, j] for j in range(k))
        total += ce / patches_in_image[image_of_patch[i]]
    assert value.item() == pytest.approx(total / 3, rel=1e-6)  # weights are fp32


def test_ibot_center_uses_mean_over_masked_patches(rng):
    patches = rng.normal(size=(6, 3))
    ibot = iBOTPatchLoss(3, center_momentum=0.9)
    assert ibot.center.shape == (1, 1, 3)
    ibot.update_center(torch.tensor(patches, dtype=torch.float32))
    probe = torch.tensor(rng.normal(size=(2, 3)), dtype=torch.float32)
    out = ibot.softmax_center_teacher(probe, 0.07)
    center = 0.1 * patches.mean(axis=0)
    np.testing.assert_allclose(ibot.center.reshape(3).numpy(), center, rtol=1e-5)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out.numpy(), np_softmax((probe.numpy() - center) / 0.07), rtol=1e-5)


def test_ibot_sinkhorn_uses_masked_count_without_mutating_it(rng):
    logits = torch.tensor(rng.normal(size=(5, 4)), dtype=torch.float32)
    count = torch.tensor(5)
    out = iBOTPatchLoss(4).sinkhorn_knopp_teacher(logits, 0.1, count)
    assert count.item() == 5
    np.testing.assert_allclose(out.numpy(), np_sinkhorn(logits.numpy(), 0.1, 3), rtol=1e-4)


# ---------------------------------------------------------------- KoLeo


def test_koleo_on_hand_made_points():
    # Unit vectors at angles 0, 0.1, 0.3 (scaled: normalisation must undo it). Nearest neighbours:
    # 0 -> 0.1 (Δ=0.1), 0.1 -> 0 (Δ=0.1), 0.3 -> 0.1 (Δ=0.2); chord length 2·sin(Δ/2).
    angles = [0.0, 0.1, 0.3]
    points = torch.tensor([[3 * math.cos(a), 3 * math.sin(a)] for a in angles], dtype=torch.float32)
    chords = [2 * math.sin(0.05), 2 * math.sin(0.05), 2 * math.sin(0.1)]
    expected = -sum(math.log(d) for d in chords) / 3
    assert koleo_loss(points).item() == pytest.approx(expected, rel=1e-5)
    assert KoLeoLoss()(points).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_matches_pairwise_distance_convention(rng):
    x = torch.tensor(rng.normal(size=(6, 5)), dtype=torch.float32)
    unit = torch.nn.functional.normalize(x, eps=1e-8)
    # Brute force nearest neighbour by Euclidean distance (same as largest dot product for unit vectors).
    dist = torch.cdist(unit, unit) + torch.eye(6) * 10
    nn_index = dist.argmin(dim=1)
    distances = torch.nn.PairwiseDistance(p=2, eps=1e-8)(unit, unit[nn_index])
    expected = -torch.log(distances + 1e-8).mean()
    torch.testing.assert_close(koleo_loss(x), expected)


def test_koleo_finite_on_duplicates():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [-3.0, 0.5]], requires_grad=True)
    value = koleo_loss(x)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    # The duplicates are each other's neighbours at distance ‖(1e-8, 1e-8)‖ = √2·1e-8.
    d_duplicate = math.sqrt(2) * 1e-8
    unit = torch.nn.functional.normalize(x.detach(), dim=1)
    d_third = (unit[2] - unit[0]).norm()
    expected = -(2 * math.log(d_duplicate + 1e-8) + math.log(d_third.item() + 1e-8)) / 3
    assert value.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("rows, width", [(5, 7), (37, 4096), (3, 1 << 20)])  # one block, many blocks, 1 row per block
def test_soft_cross_entropy_matches_autograd_of_log_softmax(rows, width):
    from dino.losses.soft_cross_entropy import soft_cross_entropy

    torch.manual_seed(0)
    logits = (torch.randn(rows, width) * 4).requires_grad_()
    targets = torch.softmax(torch.randn(rows, width) * 3, dim=-1)
    targets[0] *= 0.5  # rows need not sum to 1 (T_i enters the formula)
    row_weights = torch.rand(rows)
    reference_logits = logits.detach().clone().requires_grad_()
    expected = -(targets * torch.log_softmax(reference_logits / 0.1, dim=-1)).sum(-1)
    (expected * row_weights).sum().backward()
    got = soft_cross_entropy(logits, targets, 0.1)
    (got * row_weights).sum().backward()
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(logits.grad, reference_logits.grad, rtol=1e-4, atol=1e-7)


def test_soft_cross_entropy_rejects_bad_inputs():
    from dino.losses.soft_cross_entropy import soft_cross_entropy

    with pytest.raises(ValueError, match="both be"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4), 0.1)
    with pytest.raises(ValueError, match="positive"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
