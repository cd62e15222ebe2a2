"""Data: datasets, multi-crop augmentation, iBOT masking, collation, samplers and the demo dataset."""

from dino.data.augmentations import BLUR_PROBS, DataAugmentationDINO
from dino.data.collate import collate_data_and_cast
from dino.data.datasets import (
    IMAGE_EXTENSIONS,
    NO_LABEL,
    CorruptImageError,
    ImageFolderDataset,
    ImageListDataset,
    SkippedImageWarning,
    UnlabeledImageDataset,
    build_dataset,
    load_image,
)
from dino.data.demo_dataset import DEMO_PATTERNS, ensure_demo_dataset, make_demo_image
from dino.data.masking import MaskingGenerator
from dino.data.samplers import ShardedEpochSampler, make_data_loader
from dino.data.transforms import IMAGENET_MEAN, IMAGENET_STD, make_eval_transform, make_linear_train_transform

__all__ = [
    "BLUR_PROBS", "DataAugmentationDINO",
    "collate_data_and_cast",
    "IMAGE_EXTENSIONS", "NO_LABEL", "CorruptImageError", "ImageFolderDataset", "ImageListDataset",
    "SkippedImageWarning", "UnlabeledImageDataset", "build_dataset", "load_image",
    "DEMO_PATTERNS", "ensure_demo_dataset", "make_demo_image",
    "MaskingGenerator",
    "ShardedEpochSampler", "make_data_loader",
    "IMAGENET_MEAN", "IMAGENET_STD", "make_eval_transform", "make_linear_train_transform",
]
