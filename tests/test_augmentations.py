"""Multi-crop augmentation: shapes, counts, per-crop blur/solarisation wiring and reproducibility."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dino.data.augmentations import BLUR_PROBS, DataAugmentationDINO, RandomGaussianBlur, RandomSolarize
from dino.data.demo_dataset import make_demo_image


def small_augmentation(**overrides):
    kwargs = dict(global_crops_size=32, local_crops_size=16, local_crops_number=3)
    kwargs.update(overrides)
    return DataAugmentationDINO(**kwargs)


def stages(transform, kind):
    return [t for t in transform.transforms if isinstance(t, kind)]


def test_output_shapes_and_counts():
    out = small_augmentation()(make_demo_image("checkerboard", seed=0, image_size=48))
    assert set(out) == {"global_crops", "local_crops"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
    assert all(t.shape == (3, 32, 32) and t.dtype == torch.float32 for t in out["global_crops"])
    assert all(t.shape == (3, 16, 16) for t in out["local_crops"])


def test_zero_local_crops():
    out = small_augmentation(local_crops_number=0)(Image.new("RGB", (40, 30), (10, 200, 90)))
    assert out["local_crops"] == [] and len(out["global_crops"]) == 2


@pytest.mark.parametrize("preset", sorted(BLUR_PROBS))
def test_blur_and_solarisation_go_to_the_right_crops(preset):
    aug = small_augmentation(blur_probs=preset, solarization_prob=0.3)
    blur1, blur2, blur_local = BLUR_PROBS[preset]
    assert [b.p for b in stages(aug.global_transform1, RandomGaussianBlur)] == [blur1]
    assert [b.p for b in stages(aug.global_transform2, RandomGaussianBlur)] == [blur2]
    assert [b.p for b in stages(aug.local_transform, RandomGaussianBlur)] == [blur_local]
    assert [s.p for s in stages(aug.global_transform2, RandomSolarize)] == [0.3]
    assert stages(aug.global_transform1, RandomSolarize) == [] and stages(aug.local_transform, RandomSolarize) == []


def test_blur_presets_match_the_papers():
    assert BLUR_PROBS["dino_v1"] == (1.0, 0.1, 0.5)
    assert BLUR_PROBS["dinov2_released"] == (0.0, 0.9, 0.5)
    assert DataAugmentationDINO().blur_probs == BLUR_PROBS["dino_v1"]
    assert small_augmentation(blur_probs=(0.2, 0.3, 0.4)).blur_probs == (0.2, 0.3, 0.4)


def test_random_blur_applies_with_its_probability():
    image = make_demo_image("checkerboard", seed=1, image_size=32)
    pixels = np.asarray(image)
    random.seed(0)
    blurred = [not np.array_equal(np.asarray(RandomGaussianBlur(0.9)(image)), pixels) for _ in range(400)]
    assert 0.85 < np.mean(blurred) < 0.95
    assert all(not np.array_equal(np.asarray(RandomGaussianBlur(1.0)(image)), pixels) for _ in range(20))
    assert all(RandomGaussianBlur(0.0)(image) is image for _ in range(20))


def test_solarize_inverts_bright_pixels():
    image = Image.new("RGB", (2, 1))
    image.putdata([(200, 10, 128), (0, 255, 127)])
    assert np.asarray(RandomSolarize(1.0)(image)).tolist() == [[[55, 10, 127], [0, 0, 127]]]


def test_same_seeds_same_crops():
    aug = small_augmentation()
    image = make_demo_image("rectangles", seed=2, image_size=48)

    def run(seed):
        random.seed(seed)
        torch.manual_seed(seed)
        out = aug(image)
        return torch.cat([t.flatten() for t in out["global_crops"] + out["local_crops"]])

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError):
        DataAugmentationDINO(local_crops_number=-1)
    with pytest.raises(ValueError):
        DataAugmentationDINO(global_crops_scale=(0.5, 0.4))
    with pytest.raises(ValueError):
        DataAugmentationDINO(blur_probs=(1.0, 0.1))
    with pytest.raises(ValueError, match="choose from"):
        DataAugmentationDINO(blur_probs="dinov3")
