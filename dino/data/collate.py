"""Batch multi-crop samples and draw the iBOT masks of the global crops (DINOv2's collate).

Crops are stacked *crop-major*: all images' first global crop, then all images' second global crop (and the
same for local crops), so `chunk(2)` of the backbone output separates the two global views.

Masks: of the `2B` global crops, `int(2B · mask_probability)` get a block mask.  Their masking ratios are
spread over `[min_ratio, max_ratio]` by cutting it into that many equal bins and drawing one ratio uniformly
inside each bin (so a batch always mixes light and heavy masks); the list of masks is then shuffled so which
crop gets which mask is random.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import torch


def _stack_crop_major(crop_dicts: Sequence[dict], key: str, dtype: torch.dtype) -> torch.Tensor:
    n_crops = len(crop_dicts[0][key])
    if any(len(c[key]) != n_crops for c in crop_dicts):
        raise ValueError(f"samples of one batch have different numbers of {key}")
    if n_crops == 0:
        channels = crop_dicts[0]["global_crops"][0].shape[0]
        return torch.empty((0, channels, 0, 0), dtype=dtype)
    return torch.stack([c[key][i] for i in range(n_crops) for c in crop_dicts]).to(dtype)


def collate_data_and_cast(
    samples: Sequence[tuple[dict, int]],
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    n_tokens: int | None = None,
    mask_generator: Callable[[int], np.ndarray] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor | int]:
    """Collate `[(crops_dict, label), ...]` from `DataAugmentationDINO` into one training batch.

    Args:
        samples: B pairs of `{"global_crops": [...], "local_crops": [...]}` and a label.
        mask_ratio_tuple: (min, max) fraction of the `n_tokens` patches masked in a masked crop.
        mask_probability: fraction of the global crops that get a mask.
        n_tokens: patches per global crop (default: the mask generator's grid size).
        mask_generator: `MaskingGenerator` (or any `n -> bool (H, W)` callable); without one, no crop is
            masked and `mask_probability` must be 0.
        dtype: dtype of the returned crops (masks stay bool, weights float32).

    Returns a dict with
        `collated_global_crops` (n_global·B, 3, H, W) and `collated_local_crops` (n_local·B, 3, h, w), crop-major
        (an empty (0, 3, 0, 0) tensor when there are no local crops);
        `collated_masks` (n_global·B, n_tokens) bool; `mask_indices_list` flat indices of its True entries;
        `masks_weight` one weight per masked patch, 1 / (masked patches of its crop), so each masked crop sums to 1;
        `n_masked_patches` (1,) long; `labels` (B,) long.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    min_ratio, max_ratio = mask_ratio_tuple
    if not 0 <= min_ratio <= max_ratio <= 1:
        raise ValueError(f"mask_ratio_tuple must satisfy 0 <= min <= max <= 1, got {mask_ratio_tuple}")
    if not 0 <= mask_probability <= 1:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")

    crop_dicts = [crops for crops, _ in samples]
    collated_global_crops = _stack_crop_major(crop_dicts, "global_crops", dtype)
    collated_local_crops = _stack_crop_major(crop_dicts, "local_crops", dtype)
    labels = torch.tensor([int(label) for _, label in samples], dtype=torch.long)

    n_crops = collated_global_crops.shape[0]
    if mask_generator is None:
        if mask_probability > 0:
            raise ValueError("mask_probability > 0 needs a mask_generator")
        n_tokens = int(n_tokens or 0)
        n_masked_crops = 0
    else:
        grid_tokens = int(np.prod(mask_generator.get_shape())) if hasattr(mask_generator, "get_shape") else None
        if n_tokens is None:
            if grid_tokens is None:
                raise ValueError("pass n_tokens for a mask generator without get_shape()")
            n_tokens = grid_tokens
        elif grid_tokens is not None and grid_tokens != n_tokens:
            raise ValueError(f"n_tokens {n_tokens} does not match the mask generator's grid ({grid_tokens} patches)")
        n_masked_crops = int(n_crops * mask_probability)

    masks: list[np.ndarray] = []
    bin_edges = np.linspace(min_ratio, max_ratio, n_masked_crops + 1)
    for low, high in zip(bin_edges[:-1], bin_edges[1:]):
        masks.append(np.asarray(mask_generator(int(n_tokens * random.uniform(low, high))), dtype=bool).reshape(-1))
    empty_mask = np.zeros(n_tokens, dtype=bool)
    masks.extend(empty_mask for _ in range(n_crops - n_masked_crops))
    random.shuffle(masks)

    collated_masks = torch.from_numpy(np.stack(masks))  # (n_crops, n_tokens) bool
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_crop_count = collated_masks.sum(dim=-1, keepdim=True).clamp(min=1).to(torch.float32)
    masks_weight = (1.0 / per_crop_count).expand_as(collated_masks)[collated_masks]

    return {
        "collated_global_crops": collated_global_crops,
        "collated_local_crops": collated_local_crops,
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.full((1,), mask_indices_list.numel(), dtype=torch.long),
        "labels": labels,
    }
