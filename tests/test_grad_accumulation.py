"""Gradient accumulation: slices of a collated batch and of its teacher targets line up crop by crop."""

import random

import pytest
import torch

from dino.data.collate import collate_data_and_cast
from dino.data.masking import MaskingGenerator
from dino.train.grad_accumulation import split_batch_and_targets

B, GRID, LOCALS = 6, 4, 3


def collated_batch():
    random.seed(0)
    torch.manual_seed(0)
    samples = [
        (
            {
                "global_crops": [torch.full((3, 8, 8), 10.0 * i + c) for c in range(2)],
                "local_crops": [torch.full((3, 4, 4), 10.0 * i + 2 + c) for c in range(LOCALS)],
            },
            i,
        )
        for i in range(B)
    ]
    return collate_data_and_cast(samples, (0.1, 0.5), 0.5, mask_generator=MaskingGenerator(GRID, min_num_patches=1))


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_slices_hold_their_own_crops_masks_and_targets(parts):
    batch = collated_batch()
    tokens = GRID * GRID
    n_masked = batch["mask_indices_list"].numel()
    assert n_masked > 0
    # targets whose rows name what they belong to: the crop row for [CLS], the flat (crop, token) index for patches
    targets = {
        "cls_probs": torch.arange(2 * B, dtype=torch.float32)[:, None],
        "patch_probs": batch["mask_indices_list"].float()[:, None],
    }
    pieces = split_batch_and_targets(batch, targets, parts)
    assert len(pieces) == parts
    step = B // parts
    total_masked = 0
    for j, (micro, micro_targets) in enumerate(pieces):
        images = range(j * step, (j + 1) * step)
        assert micro["labels"].tolist() == list(images)
        # crop-major: every crop's images of this slice, in order; pixel values encode (image, crop)
        assert micro["collated_global_crops"][:, 0, 0, 0].tolist() == [10.0 * i + c for c in range(2) for i in images]
        assert micro["collated_local_crops"][:, 0, 0, 0].tolist() == [
            10.0 * i + 2 + c for c in range(LOCALS) for i in images
        ]
        assert micro_targets["cls_probs"][:, 0].tolist() == [float(c * B + i) for c in range(2) for i in images]
        # each masked patch of the slice gets the target of the same (crop, token) of the whole batch
        flat = micro["mask_indices_list"]
        crop_local, token = flat // tokens, flat % tokens
        crop_full = (crop_local // step) * B + j * step + crop_local % step
        assert micro_targets["patch_probs"][:, 0].tolist() == (crop_full * tokens + token).float().tolist()
        assert int(micro["n_masked_patches"]) == flat.numel() == micro["masks_weight"].numel()
        # the weights still make every masked crop sum to one
        per_crop = torch.zeros(2 * step).index_add_(0, crop_local, micro["masks_weight"])
        assert torch.allclose(per_crop[per_crop > 0], torch.ones(int((per_crop > 0).sum())))
        total_masked += flat.numel()
    assert total_masked == n_masked


def test_uneven_split_is_refused():
    batch = collated_batch()
    with pytest.raises(ValueError, match="4 equal parts"):
        split_batch_and_targets(batch, {"cls_probs": torch.zeros(2 * B, 1), "patch_probs": None}, 4)


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_accumulated_step_equals_the_large_batch(tmp_path, centering):
    """One training step with the batch in 1, 2 or 4 parts: the same loss, terms, gradient norm and update."""
    from dino.config import compose
    from dino.distributed import DeviceContext
    from dino.train.data_pipeline import build_training_data
    from dino.train.loop import build_optimizer, train_step
    from dino.train.meta_arch import SelfDistillationObjective, build_networks
    from dino.train.param_groups import apply_schedules
    from tests.helpers import tiny_overrides, write_image_folder

    folder = write_image_folder(tmp_path / "images")
    # SGD: the update is linear in the gradient, so equal gradients show as equal weights; KoLeo off: its
    # nearest neighbours are looked for within a part; drop path off: its draws depend on the slice shapes
    cfg = compose(
        "train/demo",
        tiny_overrides(
            folder,
            tmp_path / "out",
            8,
            "optim.optimizer=sgd",
            "model.drop_path_rate=0.0",
            "dino.koleo_loss_weight=0.0",
            "ibot.loss_weight=1.0",
            "dino.loss_style=v2",
            f"dino.centering={centering}",
        ),
    )
    ctx = DeviceContext.create("cpu")
    _, _, batch = next(build_training_data(cfg, ctx).stream(0, 0))
    assert batch["mask_indices_list"].numel() > 0
    results = {}
    for parts in (1, 2, 4):
        cfg.train.grad_accumulation_steps = parts
        torch.manual_seed(0)
        student, teacher, _ = build_networks(cfg)
        objective = SelfDistillationObjective(cfg, int(cfg.crops.local_crops_number))
        optimizer = build_optimizer(cfg, student)
        apply_schedules(optimizer, lr=0.5, wd=0.0, last_layer_lr=0.5)
        loss, terms, stats = train_step(dict(batch), student, teacher, objective, optimizer, None, ctx, cfg, 0.04)
        results[parts] = (
            float(loss),
            {k: float(v) for k, v in terms.items()},
            stats["grad_norm"],
            {k: v.detach().clone() for k, v in student.state_dict().items()},
        )
    loss, terms, grad_norm, weights = results[1]
    assert "ibot" in terms
    for parts in (2, 4):
        other_loss, other_terms, other_norm, other_weights = results[parts]
        assert other_loss == pytest.approx(loss, rel=1e-5)
        assert other_terms == pytest.approx(terms, rel=1e-5)
        assert other_norm == pytest.approx(grad_norm, rel=1e-4)
        for key, value in weights.items():
            torch.testing.assert_close(
                other_weights[key], value, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}"
            )
