"""Pictures in tensorboard while training: attention and PCA maps of a few fixed images, so a user watches
the features emerge epoch after epoch."""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from dino.data.datasets import list_images, load_image
from dino.data.transforms import make_eval_transform
from dino.eval.visualization import attention_figure_for_tensorboard, pca_figure_for_tensorboard
from dino.train.data_pipeline import resolve_data_path
from dino.train.knn_check import find_val_split
from dino.train.metrics import MetricLogger

NUM_PICTURES = 4


def fixed_images(cfg: DictConfig) -> torch.Tensor:
    """The same few images every time: spread over the val split when there is one, else the training data."""
    train_path = resolve_data_path(cfg)
    source = find_val_split(train_path) or train_path
    paths = list_images(source) if os.path.isdir(source) else []
    if not paths:
        raise FileNotFoundError(f"no images to visualise under {source}")
    picks = [paths[i * len(paths) // NUM_PICTURES] for i in range(min(NUM_PICTURES, len(paths)))]
    size = int(cfg.crops.global_crops_size)
    transform = make_eval_transform(resize_size=size, crop_size=size)
    return torch.stack([transform(load_image(p)) for p in picks])


@torch.no_grad()
def log_pictures(cfg: DictConfig, backbone: torch.nn.Module, logger: MetricLogger, step: int) -> None:
    try:
        images = fixed_images(cfg)
    except FileNotFoundError:
        return  # a file list dataset: nothing stable to show
    device = next(backbone.parameters()).device
    images = images.to(device)
    logger.add_image("features/attention", attention_figure_for_tensorboard(backbone, images), step)
    logger.add_image("features/pca", pca_figure_for_tensorboard(backbone, images), step)
