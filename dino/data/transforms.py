"""Evaluation transforms: the fixed resize + centre crop used for features, and the linear-probe training crop.

These follow the DINO v1 / DINOv2 evaluation protocol: bicubic resize of the shorter side to 256, centre crop
224, ImageNet normalisation.
"""

from __future__ import annotations

from torchvision import transforms

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

BICUBIC = transforms.InterpolationMode.BICUBIC


def make_normalize() -> transforms.Compose:
    """PIL image → float tensor (C, H, W) normalised with the ImageNet mean and std."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def make_eval_transform(resize_size: int = 256, crop_size: int = 224) -> transforms.Compose:
    """Resize the shorter side to `resize_size` (bicubic), centre-crop `crop_size`, normalise."""
    if crop_size > resize_size:
        raise ValueError(f"crop_size {crop_size} is larger than resize_size {resize_size}")
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=BICUBIC),
        transforms.CenterCrop(crop_size),
        make_normalize(),
    ])


def make_linear_train_transform(crop_size: int = 224) -> transforms.Compose:
    """Training transform of linear probes: RandomResizedCrop (bicubic), horizontal flip, normalise."""
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size, interpolation=BICUBIC),
        transforms.RandomHorizontalFlip(),
        make_normalize(),
    ])
