"""Multi-crop augmentation of DINO / DINOv2: two global views and several small local views of one image.

Every crop gets RandomResizedCrop (bicubic), a horizontal flip (p 0.5), colour jitter (p 0.8), grayscale
(p 0.2), then per-view Gaussian blur / solarisation, then ImageNet normalisation.

Blur probabilities are `(global crop 1, global crop 2, local crops)`:

- `(1.0, 0.1, 0.5)` — DINO v1, and the numbers written in DINOv2's augmentation code;
- `(0.0, 0.9, 0.5)` — what the released DINOv2 models were actually trained with: DINOv2's blur transform
  applies the blur with probability `1 - p`, so global crop 1 was never blurred and global crop 2 was
  blurred 90 % of the time (dinov2 PR #411, dinov3 PR #342).

Pick the preset you want to reproduce from `BLUR_PROBS`.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from dino.data.transforms import BICUBIC, make_normalize

BLUR_PROBS: dict[str, tuple[float, float, float]] = {
    "dino_v1": (1.0, 0.1, 0.5),
    "dinov2_released": (0.0, 0.9, 0.5),
}

# Blur radius range of DINO v1 / DINOv2 (PIL GaussianBlur radius, in pixels of the crop).
BLUR_RADIUS = (0.1, 2.0)


class RandomGaussianBlur:
    """PIL Gaussian blur with probability `p` and a radius drawn uniformly from `radius_range`.

    Uses Python's `random`, which DataLoader workers seed (see `dino.data.samplers`), so it is reproducible.
    """

    def __init__(self, p: float, radius_range: tuple[float, float] = BLUR_RADIUS):
        self.p = p
        self.radius_range = radius_range

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.p <= 0 or random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.radius_range)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius_range={self.radius_range})"


class RandomSolarize:
    """Solarise (invert pixels ≥ 128) with probability `p`."""

    def __init__(self, p: float, threshold: int = 128):
        self.p = p
        self.threshold = threshold

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.p <= 0 or random.random() >= self.p:
            return image
        return ImageOps.solarize(image, threshold=self.threshold)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {tuple(scale)}")
    return float(scale[0]), float(scale[1])


def resolve_blur_probs(blur_probs: Sequence[float] | str) -> tuple[float, float, float]:
    """Accept a preset name of `BLUR_PROBS` or three probabilities; validate them."""
    if isinstance(blur_probs, str):
        if blur_probs not in BLUR_PROBS:
            raise ValueError(f"unknown blur preset {blur_probs!r}; choose from {sorted(BLUR_PROBS)}")
        return BLUR_PROBS[blur_probs]
    probs = tuple(float(p) for p in blur_probs)
    if len(probs) != 3 or not all(0 <= p <= 1 for p in probs):
        raise ValueError(f"blur_probs must be three probabilities (global 1, global 2, locals), got {blur_probs}")
    return probs  # type: ignore[return-value]


class DataAugmentationDINO:
    """Image → `{"global_crops": [g1, g2], "local_crops": [l1, ..., ln]}` of normalised (3, S, S) tensors.

    `blur_probs` is `(global 1, global 2, locals)` or a key of `BLUR_PROBS`: `(1.0, 0.1, 0.5)` is DINO v1;
    `(0.0, 0.9, 0.5)` reproduces what the released DINOv2 models were trained with (their code inverts the
    blur probability).  Solarisation applies to global crop 2 only.  `local_crops_number` may be 0.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.4, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.4),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        blur_probs: Sequence[float] | str = BLUR_PROBS["dino_v1"],
        solarization_prob: float = 0.2,
    ):
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        if not 0 <= solarization_prob <= 1:
            raise ValueError(f"solarization_prob must be in [0, 1], got {solarization_prob}")
        self.global_crops_scale = _check_scale("global_crops_scale", global_crops_scale)
        self.local_crops_scale = _check_scale("local_crops_scale", local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.blur_probs = resolve_blur_probs(blur_probs)
        self.solarization_prob = float(solarization_prob)

        flip_and_colour = [
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
            ),
            transforms.RandomGrayscale(p=0.2),
        ]
        normalize = make_normalize()
        blur_global1, blur_global2, blur_local = self.blur_probs

        def global_crop() -> transforms.RandomResizedCrop:
            return transforms.RandomResizedCrop(
                self.global_crops_size, scale=self.global_crops_scale, interpolation=BICUBIC
            )

        self.global_transform1 = transforms.Compose(
            [global_crop(), *flip_and_colour, RandomGaussianBlur(blur_global1), normalize]
        )
        self.global_transform2 = transforms.Compose(
            [
                global_crop(),
                *flip_and_colour,
                RandomGaussianBlur(blur_global2),
                RandomSolarize(self.solarization_prob),
                normalize,
            ]
        )
        self.local_transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    self.local_crops_size, scale=self.local_crops_scale, interpolation=BICUBIC
                ),
                *flip_and_colour,
                RandomGaussianBlur(blur_local),
                normalize,
            ]
        )

    def __call__(self, image: Image.Image) -> dict[str, list[torch.Tensor]]:
        return {
            "global_crops": [self.global_transform1(image), self.global_transform2(image)],
            "local_crops": [self.local_transform(image) for _ in range(self.local_crops_number)],
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_crops_scale={self.global_crops_scale}, "
            f"local_crops_scale={self.local_crops_scale}, local_crops_number={self.local_crops_number}, "
            f"global_crops_size={self.global_crops_size}, local_crops_size={self.local_crops_size}, "
            f"blur_probs={self.blur_probs}, solarization_prob={self.solarization_prob})"
        )
