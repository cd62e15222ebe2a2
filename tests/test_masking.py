"""Block masking generator and the DINOv2 collate (crop order, masked-crop count, ratio bins, weights)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dino.data.collate import collate_data_and_cast
from dino.data.masking import MaskingGenerator

# ------------------------------------------------------------------------------------ masking generator


def bounding_box(mask):
    rows, cols = np.nonzero(mask)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


@pytest.mark.parametrize("grid", [(14, 14), (8, 12), (37, 37)])
def test_requested_counts_are_met_and_never_exceeded(grid):
    generator = MaskingGenerator(grid, max_num_patches=grid[0] * grid[1] // 2)
    n_tokens = grid[0] * grid[1]
    random.seed(0)
    shortfalls = []
    for _ in range(200):
        request = int(n_tokens * random.uniform(0.1, 0.5))
        mask = generator(request)
        assert mask.shape == grid and mask.dtype == bool
        assert mask.sum() <= request
        shortfalls.append(request - int(mask.sum()))
    assert np.mean(np.array(shortfalls) == 0) > 0.6
    assert max(shortfalls) < generator.min_num_patches


def test_zero_and_full_requests():
    generator = MaskingGenerator(6)
    assert generator(0).sum() == 0
    random.seed(1)
    assert generator(36).sum() > 30  # near-full grids stop after bounded failures instead of looping
    assert generator(1000).sum() <= 36


def test_a_single_block_has_the_requested_area_and_aspect():
    generator = MaskingGenerator(16, min_num_patches=12, max_num_patches=12, min_aspect=0.3)
    random.seed(2)
    shapes = set()
    for _ in range(200):
        mask = generator(12)
        h, w = bounding_box(mask)
        assert mask.sum() == 12 == h * w  # one solid rectangle
        assert 0.3 <= h / w <= 1 / 0.3
        shapes.add((h, w))
    assert shapes == {(2, 6), (3, 4), (4, 3), (6, 2)}  # 1×12 / 12×1 have aspect 12, outside the range


def test_requests_below_the_block_minimum_use_one_small_block():
    generator = MaskingGenerator(10)
    random.seed(3)
    for request in (1, 2, 3):
        mask = generator(request)
        h, w = bounding_box(mask)
        assert mask.sum() == request == h * w


def test_every_masked_patch_lies_in_a_block_of_at_least_two_by_two():
    # Area >= 4 with aspect <= 1/0.3 rules out 1-wide blocks (1×4 has aspect 4), so every masked patch must
    # sit in a fully masked 2×2 window.
    generator = MaskingGenerator(14, max_num_patches=98)
    random.seed(4)
    for _ in range(100):
        mask = generator(random.randint(4, 98))
        windows = mask[:-1, :-1] & mask[1:, :-1] & mask[:-1, 1:] & mask[1:, 1:]
        covered = np.zeros_like(mask)
        for dr in (0, 1):
            for dc in (0, 1):
                covered[dr : dr + 13, dc : dc + 13] |= windows
        assert np.array_equal(covered, mask)


def test_aspect_ratios_span_the_log_uniform_range():
    # One block of exactly 24 patches: 3×8, 4×6, 6×4 or 8×3 (2×12 has aspect 6, outside [0.3, 3.33]).
    generator = MaskingGenerator(30, min_num_patches=24, max_num_patches=24, min_aspect=0.3)
    random.seed(5)
    aspects = [np.divide(*bounding_box(generator(24))) for _ in range(300)]
    assert set(np.round(aspects, 3)) == {0.375, 0.667, 1.5, 2.667}
    assert abs(np.mean(np.log(aspects))) < 0.2  # log-uniform: symmetric around square


def test_invalid_generator_settings():
    with pytest.raises(ValueError):
        MaskingGenerator(8, min_num_patches=10, max_num_patches=5)
    with pytest.raises(ValueError):
        MaskingGenerator(8, min_aspect=0)


# ------------------------------------------------------------------------------------------- collate


def make_samples(batch, n_local=3, global_size=16, local_size=8):
    """Crop j of sample b is filled with 100·j + b (locals: 1000 + 100·j + b) so ordering is visible."""
    samples = []
    for b in range(batch):
        crops = {
            "global_crops": [torch.full((3, global_size, global_size), 100.0 * j + b) for j in range(2)],
            "local_crops": [torch.full((3, local_size, local_size), 1000.0 + 100 * j + b) for j in range(n_local)],
        }
        samples.append((crops, b % 3))
    return samples


class ExactGenerator:
    """Masks exactly the first n patches: isolates the collate's ratio logic from the block placement."""

    def __init__(self, side):
        self.side = side

    def get_shape(self):
        return self.side, self.side

    def __call__(self, n):
        mask = np.zeros(self.side * self.side, dtype=bool)
        mask[:n] = True
        return mask.reshape(self.side, self.side)


def test_collate_stacks_crop_major():
    out = collate_data_and_cast(make_samples(4), mask_generator=MaskingGenerator(4), dtype=torch.float32)
    assert out["collated_global_crops"].shape == (8, 3, 16, 16)
    assert out["collated_local_crops"].shape == (12, 3, 8, 8)
    assert out["collated_global_crops"][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 100, 101, 102, 103]
    assert out["collated_local_crops"][:, 0, 0, 0].tolist() == [1000 + 100 * j + b for j in range(3) for b in range(4)]
    assert out["labels"].tolist() == [0, 1, 2, 0] and out["labels"].dtype == torch.long


def test_collate_masks_ratio_bins_weights_and_bounds():
    batch, side = 6, 10
    n_tokens, n_crops = side * side, 2 * batch
    random.seed(0)
    for mask_probability in (0.5, 0.3, 1.0):
        out = collate_data_and_cast(
            make_samples(batch),
            mask_ratio_tuple=(0.1, 0.5),
            mask_probability=mask_probability,
            n_tokens=n_tokens,
            mask_generator=ExactGenerator(side),
        )
        masks = out["collated_masks"]
        assert masks.shape == (n_crops, n_tokens) and masks.dtype == torch.bool
        counts = masks.sum(dim=1)
        n_masked = int(n_crops * mask_probability)
        assert int((counts > 0).sum()) == n_masked

        # The k-th lightest masked crop drew its ratio from the k-th bin of linspace(0.1, 0.5, n_masked + 1).
        edges = np.linspace(0.1, 0.5, n_masked + 1)
        for k, count in enumerate(sorted(counts[counts > 0].tolist())):
            assert int(n_tokens * edges[k]) <= count <= int(n_tokens * edges[k + 1])

        assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
        assert out["n_masked_patches"].tolist() == [int(counts.sum())]
        weights = torch.zeros(n_crops * n_tokens)
        weights[out["mask_indices_list"]] = out["masks_weight"]
        per_crop = weights.view(n_crops, n_tokens).sum(dim=1)
        assert torch.allclose(per_crop[counts > 0], torch.ones(n_masked))
        assert per_crop[counts == 0].abs().sum() == 0


def test_collate_shuffles_which_crops_are_masked():
    random.seed(1)
    patterns = set()
    for _ in range(20):
        out = collate_data_and_cast(make_samples(4), mask_generator=ExactGenerator(8))
        patterns.add(tuple((out["collated_masks"].sum(1) > 0).tolist()))
    assert len(patterns) > 5


def test_collate_with_real_generator_and_dtype():
    random.seed(2)
    generator = MaskingGenerator(8, max_num_patches=32)
    out = collate_data_and_cast(
        make_samples(4, n_local=0), mask_probability=0.5, mask_generator=generator, dtype=torch.bfloat16
    )
    assert out["collated_global_crops"].dtype == torch.bfloat16
    assert out["collated_local_crops"].numel() == 0 and out["collated_local_crops"].shape[0] == 0
    counts = out["collated_masks"].sum(1)
    assert int((counts > 0).sum()) == 4
    assert all(int(64 * 0.1) - 3 <= c <= int(64 * 0.5) for c in counts[counts > 0].tolist())


def test_collate_without_masking():
    out = collate_data_and_cast(make_samples(3), mask_probability=0.0, n_tokens=16)
    assert out["collated_masks"].shape == (6, 16) and not out["collated_masks"].any()
    assert out["n_masked_patches"].item() == 0 and out["masks_weight"].numel() == 0
    with pytest.raises(ValueError, match="mask_generator"):
        collate_data_and_cast(make_samples(3), mask_probability=0.5)
    with pytest.raises(ValueError, match="n_tokens"):
        collate_data_and_cast(make_samples(3), n_tokens=10, mask_generator=MaskingGenerator(4))
