"""`train.grad_accumulation_steps`: one optimiser update from a batch too large for the device, in parts.

The teacher embeds the whole batch once (no gradients, so its memory is small) and its targets — centering,
Sinkhorn-Knopp and the center EMA all see the whole batch, exactly as without accumulation. The student then
runs on `parts` slices of the images, each loss scaled by 1/parts, gradients adding up before the one update.
Every loss term is a mean over images (the iBOT term a weighted sum over masked patches divided by the number
of global crops), so the accumulated gradient is the large batch's gradient. One exception: KoLeo looks for
each [CLS] embedding's nearest neighbour, and a slice sees only its own images (as each GPU of a data-parallel
run does).
"""

from __future__ import annotations

import torch
from torch import Tensor

# keys of a collated batch laid out crop-major: (n_crops · B, ...) with image b of crop c at row c·B + b
_CROP_MAJOR = ("collated_global_crops", "collated_local_crops", "collated_masks")


def _image_slice(tensor: Tensor, n_images: int, start: int, stop: int) -> Tensor:
    """Rows of images [start, stop) of every crop of a crop-major (n_crops · n_images, ...) tensor."""
    if tensor.shape[0] == 0:
        return tensor
    crops = tensor.shape[0] // n_images
    return tensor.reshape(crops, n_images, *tensor.shape[1:])[:, start:stop].reshape(-1, *tensor.shape[1:])


def split_batch_and_targets(batch: dict, targets: dict[str, Tensor | None], parts: int) -> list[tuple[dict, dict]]:
    """Split a collated multi-crop batch and the teacher targets computed on it into `parts` image slices.

    Each slice is a batch in the collate's own layout (crop-major crops, masks, flat mask indices, per-patch
    weights, masked-patch count, labels) with the targets of exactly its crops and masked patches, in the
    order the student produces them.
    """
    n_images = int(batch["labels"].shape[0])
    if parts < 1 or n_images % parts:
        raise ValueError(f"cannot split a batch of {n_images} images into {parts} equal parts")
    step = n_images // parts
    masks = batch.get("collated_masks")
    masked_image = None
    if masks is not None and targets.get("patch_probs") is not None:
        tokens = masks.shape[1]
        # the image of each masked patch: flat index → crop (c·B + b) → b
        masked_image = (batch["mask_indices_list"] // tokens) % n_images
    unknown = set(targets) - {"cls_probs", "patch_probs"}
    if unknown:
        raise ValueError(f"do not know how to split the teacher targets {sorted(unknown)}")
    pieces = []
    for start in range(0, n_images, step):
        stop = start + step
        micro = dict(batch)
        for key in _CROP_MAJOR:
            if key in batch:
                micro[key] = _image_slice(batch[key], n_images, start, stop)
        micro["labels"] = batch["labels"][start:stop]
        micro_targets = {"cls_probs": _image_slice(targets["cls_probs"], n_images, start, stop), "patch_probs": None}
        if masks is not None:
            micro["mask_indices_list"] = micro["collated_masks"].flatten().nonzero().flatten()
            micro["n_masked_patches"] = torch.full(
                (1,), micro["mask_indices_list"].numel(), dtype=torch.long, device=masks.device
            )
            if masked_image is not None:
                keep = (masked_image >= start) & (masked_image < stop)
                micro["masks_weight"] = batch["masks_weight"][keep]
                micro_targets["patch_probs"] = targets["patch_probs"][keep]
        pieces.append((micro, micro_targets))
    return pieces
