"""From a config to an endless, resumable stream of multi-crop batches."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from omegaconf import DictConfig

from dino.data.augmentations import DataAugmentationDINO
from dino.data.collate import collate_data_and_cast
from dino.data.datasets import build_dataset
from dino.data.demo_dataset import ensure_demo_dataset
from dino.data.masking import MaskingGenerator
from dino.data.samplers import ShardedEpochSampler, make_data_loader
from dino.distributed import DeviceContext, get_world_size
from dino.errors import UserError


def resolve_data_path(cfg: DictConfig) -> str:
    """`train.data_path`, or the built-in demo dataset's train split when it is empty."""
    if cfg.train.data_path:
        return os.path.expanduser(str(cfg.train.data_path))
    return os.path.join(ensure_demo_dataset(), "train")


@dataclass
class TrainingData:
    dataset: torch.utils.data.Dataset
    sampler: ShardedEpochSampler
    batch_size: int
    num_workers: int
    collate_fn: functools.partial
    seed: int
    pin_memory: bool

    @property
    def batches_per_data_epoch(self) -> int:
        return self.sampler.num_samples_per_epoch // self.batch_size

    def stream(self, data_epoch: int, batch_index: int) -> Iterator[tuple[int, int, dict]]:
        """Yield `(data_epoch, batch_index, batch)` forever, starting at the given position.

        The position is all a checkpoint needs to continue with exactly the same batches.
        """
        while True:
            self.sampler.set_epoch(data_epoch)
            self.sampler.set_start_index(batch_index * self.batch_size)
            loader = make_data_loader(
                self.dataset,
                self.batch_size,
                self.num_workers,
                self.sampler,
                self.collate_fn,
                pin_memory=self.pin_memory,
                drop_last=True,
                seed=self.seed,
            )
            for batch in loader:
                yield data_epoch, batch_index, batch
                batch_index += 1
            data_epoch, batch_index = data_epoch + 1, 0


def build_training_data(cfg: DictConfig, ctx: DeviceContext) -> TrainingData:
    """Dataset (labelled or not), multi-crop augmentation, iBOT masking and the sharded sampler."""
    data_path = resolve_data_path(cfg)
    crops = cfg.crops
    augmentation = DataAugmentationDINO(
        global_crops_scale=tuple(crops.global_crops_scale),
        local_crops_scale=tuple(crops.local_crops_scale),
        local_crops_number=int(crops.local_crops_number),
        global_crops_size=int(crops.global_crops_size),
        local_crops_size=int(crops.local_crops_size),
        blur_probs=tuple(crops.blur_probs),
        solarization_prob=float(crops.solarization_prob),
    )
    dataset = build_dataset(data_path, transform=augmentation)
    patch_size = int(cfg.model.patch_size)
    if int(crops.global_crops_size) % patch_size or int(crops.local_crops_size) % patch_size:
        raise UserError(
            f"crop sizes ({crops.global_crops_size}, {crops.local_crops_size}) must be multiples of the "
            f"patch size {patch_size}"
        )
    grid = int(crops.global_crops_size) // patch_size
    use_ibot = float(cfg.ibot.loss_weight) > 0
    collate_fn = functools.partial(
        collate_data_and_cast,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=float(cfg.ibot.mask_sample_probability) if use_ibot else 0.0,
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator(
            (grid, grid),
            max_num_patches=int(float(cfg.ibot.mask_block_max_fraction) * grid * grid),
            min_num_patches=int(cfg.ibot.mask_block_min_patches),
            min_aspect=float(cfg.ibot.mask_block_min_aspect),
        )
        if use_ibot
        else None,
    )
    batch_size = int(cfg.train.batch_size_per_device)
    sampler = ShardedEpochSampler(len(dataset), shuffle=True, seed=int(cfg.train.seed), drop_last=True)
    if sampler.num_samples_per_epoch < batch_size:
        raise UserError(
            f"{data_path} has {len(dataset)} images: fewer than one batch of {batch_size} per rank "
            f"on {get_world_size()} rank(s); lower --batch_size_per_device"
        )
    return TrainingData(
        dataset, sampler, batch_size, int(cfg.train.num_workers), collate_fn, int(cfg.train.seed), ctx.pin_memory
    )
