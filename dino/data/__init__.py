"""Data: datasets, multi-crop augmentation, iBOT masking, collation, samplers and the demo dataset."""

import importlib

# Attributes are imported on first use (PEP 562): `dino extract` needs the image listing and decoding only, and the
# augmentations import torchvision, whose import pulls in torch._dynamo (~170 MB of resident memory).
_LAZY = {
    "BLUR_PROBS": "augmentations",
    "DataAugmentationDINO": "augmentations",
    "collate_data_and_cast": "collate",
    "IMAGE_EXTENSIONS": "datasets",
    "NO_LABEL": "datasets",
    "CorruptImageError": "datasets",
    "ImageFolderDataset": "datasets",
    "ImageListDataset": "datasets",
    "SkippedImageWarning": "datasets",
    "UnlabeledImageDataset": "datasets",
    "build_dataset": "datasets",
    "load_image": "datasets",
    "DEMO_PATTERNS": "demo_dataset",
    "ensure_demo_dataset": "demo_dataset",
    "make_demo_image": "demo_dataset",
    "MaskingGenerator": "masking",
    "ShardedEpochSampler": "samplers",
    "make_data_loader": "samplers",
    "IMAGENET_MEAN": "transforms",
    "IMAGENET_STD": "transforms",
    "make_eval_transform": "transforms",
    "make_linear_train_transform": "transforms",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        if name in set(_LAZY.values()):  # a submodule, as `import dino.data` used to bind them all
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "BLUR_PROBS",
    "DataAugmentationDINO",
    "collate_data_and_cast",
    "IMAGE_EXTENSIONS",
    "NO_LABEL",
    "CorruptImageError",
    "ImageFolderDataset",
    "ImageListDataset",
    "SkippedImageWarning",
    "UnlabeledImageDataset",
    "build_dataset",
    "load_image",
    "DEMO_PATTERNS",
    "ensure_demo_dataset",
    "make_demo_image",
    "MaskingGenerator",
    "ShardedEpochSampler",
    "make_data_loader",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "make_eval_transform",
    "make_linear_train_transform",
]
