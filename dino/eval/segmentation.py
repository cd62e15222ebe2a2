"""Linear semantic segmentation of a frozen backbone: DINOv2's "lin." and "+ms" protocols.

    features = patch tokens of the chosen blocks (final norm applied), as maps (B, D, h, w); several blocks
               are concatenated along channels ("+ms": the last four)
    logits   = Conv1×1(BatchNorm(features))  (mmseg BNHead: SyncBN when distributed, conv init N(0, 0.01²))
    training = cross-entropy (ignore 255, mean over all pixels as mmseg) of the logits upsampled bilinearly
               to the label crop; AdamW, poly decay with linear warm-up, by iteration
    test     = keep-ratio resize to the test scale, sliding windows (crop, stride) whose logits are averaged
               where they overlap, upsampled to the label size; "+ms": the softmax averaged over the scale
               ratios and horizontal flips

Scores: mIoU, mAcc, aAcc and per-class IoU/Acc, computed as mmsegmentation does (`dense_metrics`).
Results go to `<output_dir>/segmentation_results.json`, curves to `<output_dir>/tensorboard`, and a picture of
a few validation images (image | ground truth | prediction) to `<output_dir>/segmentation_predictions.png`.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dino.distributed import DeviceContext, all_reduce_sum, get_rank, get_world_size, is_main_process
from dino.errors import UserError
from dino.eval import dense_common as common
from dino.eval.dense_data import (
    SegmentationDataset,
    SegmentationFiles,
    SegTrainAugmentation,
    denormalize,
    palette,
    segmentation_files,
)
from dino.eval.dense_metrics import IGNORE_INDEX, intersect_and_union, segmentation_metrics
from dino.log import get_logger

logger = get_logger(__name__)

CHECKPOINT_NAME = "segmentation_head.pth"
RESULTS_NAME = "segmentation_results.json"
PICTURE_NAME = "segmentation_predictions.png"


class LinearSegmentationHead(nn.Module):
    """BatchNorm + 1×1 convolution over the concatenated patch-token maps of `num_layers` blocks."""

    def __init__(self, embed_dim: int, num_layers: int, num_classes: int):
        super().__init__()
        channels = embed_dim * num_layers
        self.embed_dim, self.num_layers, self.num_classes = embed_dim, num_layers, num_classes
        self.bn = nn.BatchNorm2d(channels)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        maps = [patch for patch, _ in features]
        size = maps[0].shape[-2:]
        maps = [
            m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in maps
        ]
        return self.conv_seg(self.bn(torch.cat(maps, dim=1)))


class SegmentationProbe:
    """A frozen backbone, the blocks it reads, and a head: logits of image batches at their own size."""

    def __init__(
        self, model: nn.Module, head: LinearSegmentationHead, layers: Sequence[int], device_ctx: DeviceContext
    ):
        self.model, self.head, self.layers, self.device_ctx = model, head, list(layers), device_ctx
        self.patch_size = common.patch_size_of(model)

    def logits(self, images: Tensor, head: nn.Module | None = None) -> Tensor:
        """(B, C, H, W) logits at the size of `images` (padded to the patch size inside, cropped back)."""
        padded, pads = common.center_pad(images, self.patch_size)
        features = common.backbone_features(self.model, padded, self.layers, self.device_ctx)
        logits = (head or self.head)(features)
        logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return common.uncrop_padding(logits, pads)

    @torch.no_grad()
    def slide_logits(self, image: Tensor, crop: Sequence[int], stride: Sequence[int]) -> Tensor:
        """mmseg's 'slide' inference of one (1, 3, H, W) image: windows of `crop` every `stride` (the last
        one flush with the border), logits summed and divided by how many windows cover each pixel."""
        _, _, height, width = image.shape
        crop_h, crop_w = crop
        stride_h, stride_w = stride
        rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
        cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
        total = torch.zeros(1, self.head.num_classes, height, width, device=image.device)
        count = torch.zeros(1, 1, height, width, device=image.device)
        for r in range(rows):
            for c in range(cols):
                y2 = min(r * stride_h + crop_h, height)
                x2 = min(c * stride_w + crop_w, width)
                y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
                total[..., y1:y2, x1:x2] += self.logits(image[..., y1:y2, x1:x2])
                count[..., y1:y2, x1:x2] += 1
        return total / count

    @torch.no_grad()
    def predict(self, image: Tensor, label_size: Sequence[int], test) -> Tensor:
        """Class probabilities (C, H_label, W_label) of one normalised image (3, H, W) at its original size:
        for each ratio (× the keep-ratio test scale) and flip, the softmax of the (slide or whole) logits
        resized to the label; averaged (mmseg's aug_test)."""
        image = image.unsqueeze(0).to(self.device_ctx.device)
        probabilities = None
        flips = (False, True) if bool(test.flip) else (False,)
        ratios = [float(r) for r in test.ratios]
        for ratio in ratios:
            scale = [int(s * ratio) for s in test.scale]
            factor = common_rescale(image.shape[-2], image.shape[-1], scale)
            size = (max(1, int(image.shape[-2] * factor + 0.5)), max(1, int(image.shape[-1] * factor + 0.5)))
            scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
            for flip in flips:
                inputs = scaled.flip(-1) if flip else scaled
                if test.mode == "slide":
                    logits = self.slide_logits(inputs, list(test.crop_size), list(test.stride))
                elif test.mode == "whole":
                    logits = self.logits(inputs)
                else:
                    raise UserError(f"test.mode must be slide or whole, got {test.mode!r}")
                if flip:
                    logits = logits.flip(-1)
                logits = F.interpolate(logits, size=tuple(label_size), mode="bilinear", align_corners=False)
                probs = logits.softmax(dim=1)[0]
                probabilities = probs if probabilities is None else probabilities + probs
        return probabilities / (len(ratios) * len(flips))


def common_rescale(height: int, width: int, scale: Sequence[int]) -> float:
    from dino.eval.dense_data import rescale_factor

    return rescale_factor(height, width, scale)


@torch.no_grad()
def evaluate_segmentation(
    probe: SegmentationProbe, dataset: SegmentationDataset, test, desc: str = "val", num_workers: int = 0
) -> dict:
    """Areas summed over the validation images (each rank a strided shard, summed across ranks) → metrics."""
    was_training = probe.head.training
    probe.head.eval()
    indices = list(range(get_rank(), len(dataset), get_world_size()))
    loader = DataLoader(
        Subset(dataset, indices), batch_size=None, shuffle=False, num_workers=min(num_workers, os.cpu_count() or 1)
    )
    areas = torch.zeros(4, probe.head.num_classes, dtype=torch.float64, device=probe.device_ctx.device)
    for image, label, _ in tqdm(loader, desc=desc, disable=not is_main_process(), dynamic_ncols=True, leave=False):
        prediction = probe.predict(image, label.shape, test).argmax(dim=0).cpu()
        areas += intersect_and_union(prediction, label, probe.head.num_classes).to(areas.device)
        probe.device_ctx.mark_step()
    all_reduce_sum(areas)
    probe.head.train(was_training)
    return segmentation_metrics(areas.cpu(), dataset.files.class_names)


@torch.no_grad()
def prediction_picture(probe: SegmentationProbe, dataset: SegmentationDataset, test, count: int):
    """Image | ground truth | prediction for the first `count` validation images (ignore = white)."""
    colours = palette(probe.head.num_classes)
    rows = []
    probe.head.eval()
    for index in range(min(count, len(dataset))):
        image, label, _ = dataset[index]
        prediction = probe.predict(image, label.shape, test).argmax(dim=0).cpu().numpy()
        shown = label.numpy().clip(0, 255)
        rows.append([denormalize(image), colours[shown], colours[prediction.clip(0, 255)]])
    return common.picture_grid(rows) if rows else None


def _pairs(value, what: str) -> list[int]:
    values = [int(v) for v in value] if hasattr(value, "__len__") and not isinstance(value, str) else [int(value)]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise UserError(f"{what} must be one or two positive sizes (height width), got {list(values)}")
    return values


def run_segmentation(cfg) -> dict:
    """`eval_semantic_segmentation.py`: datasets, frozen backbone, head training, sliding-window test, results."""
    files_train: SegmentationFiles = segmentation_files(cfg.dataset, cfg.data_path, "train")
    files_val: SegmentationFiles = segmentation_files(cfg.dataset, cfg.data_path, "val")
    aug = cfg.augmentation
    crop = _pairs(aug.crop_size, "augmentation.crop_size")
    _pairs(cfg.test.crop_size, "test.crop_size")
    _pairs(cfg.test.stride, "test.stride")
    training, device_ctx, model, layers = common.frozen_backbone_for_probe(cfg)
    head = LinearSegmentationHead(model.embed_dim, len(layers), files_train.num_classes)
    head = common.head_on_device(head, device_ctx)
    probe = SegmentationProbe(model, head, layers, device_ctx)
    train_set = SegmentationDataset(
        files_train,
        SegTrainAugmentation(
            crop_size=tuple(crop),
            scale=tuple(int(s) for s in aug.scale),
            ratio_range=tuple(float(r) for r in aug.ratio_range),
            cat_max_ratio=float(aug.cat_max_ratio),
            photometric=bool(aug.photometric),
        ),
        seed=training.seed,
    )
    val_set = SegmentationDataset(files_val)
    global_batch = training.batch_size_per_device * get_world_size()
    protocol = dict(
        dataset=cfg.dataset,
        checkpoint=cfg.model.pretrained_weights or "official release",
        head=cfg.protocol,
        layers=[i + 1 for i in layers],
        iterations=training.iterations,
        global_batch_size=global_batch,
        optimizer=f"AdamW lr {training.lr:g} wd {training.weight_decay:g}, poly^{training.power:g} after "
        f"{training.warmup_iters} warm-up iterations",
        train_crop=crop,
        test=f"{cfg.test.mode} crop {list(cfg.test.crop_size)} stride {list(cfg.test.stride)}, scale {list(cfg.test.scale)}, "
        f"ratios {list(cfg.test.ratios)}, flip {bool(cfg.test.flip)}",
    )
    logger.info(
        f"segmentation probe ({cfg.protocol}): {len(train_set)} train / {len(val_set)} val images, "
        f"{files_train.num_classes} classes; " + "; ".join(f"{k}={v}" for k, v in protocol.items())
    )
    signature = dict(
        dataset=cfg.dataset,
        layers=layers,
        embed_dim=int(model.embed_dim),
        num_classes=files_train.num_classes,
        iterations=training.iterations,
    )

    def loss_fn(trained_head: nn.Module, batch, iteration: int) -> Tensor:
        images, labels = batch
        images = images.to(device_ctx.device, non_blocking=True)
        labels = labels.to(device_ctx.device, non_blocking=True)
        logits = probe.logits(images, head=trained_head)
        losses = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        return losses.mean()  # mmseg's default: over every pixel, the ignored ones contributing 0

    def evaluate_fn(iteration: int, writer) -> dict:
        metrics = evaluate_segmentation(probe, val_set, cfg.test, f"val at {iteration}", training.num_workers)
        common.log_scalars(
            writer, "val", dict(mIoU=metrics["mIoU"], mAcc=metrics["mAcc"], aAcc=metrics["aAcc"]), iteration
        )
        logger.info(f"iteration {iteration}: mIoU {metrics['mIoU']:.2f}, mAcc {metrics['mAcc']:.2f}")
        return dict(mIoU=metrics["mIoU"], mAcc=metrics["mAcc"], aAcc=metrics["aAcc"])

    done, history, writer = common.train_head(
        head,
        train_set,
        training,
        device_ctx,
        cfg.output_dir,
        CHECKPOINT_NAME,
        signature,
        loss_fn,
        evaluate_fn,
        desc="segmentation head",
    )
    metrics = evaluate_segmentation(probe, val_set, cfg.test, "final val", training.num_workers)
    common.log_scalars(writer, "val", dict(mIoU=metrics["mIoU"], mAcc=metrics["mAcc"], aAcc=metrics["aAcc"]), done)
    if not is_main_process():
        return {}
    picture = prediction_picture(probe, val_set, cfg.test, int(cfg.num_pictures))
    logger.info(format_segmentation_table(metrics))
    logger.info(
        f"mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  aAcc {metrics['aAcc']:.2f} "
        f"({files_val.name} val, {len(val_set)} images)"
    )
    summary = dict(protocol=protocol, num_train=len(train_set), num_val=len(val_set), history=history, **metrics)
    return common.finish_probe(cfg.output_dir, RESULTS_NAME, PICTURE_NAME, picture, writer, done, summary)


def format_segmentation_table(metrics: dict) -> str:
    lines = [f"{'class':<24} {'IoU':>7} {'Acc':>7}"]
    for name, row in metrics["per_class"].items():
        iou = "nan" if np.isnan(row["IoU"]) else f"{row['IoU']:.2f}"
        acc = "nan" if np.isnan(row["Acc"]) else f"{row['Acc']:.2f}"
        lines.append(f"{name[:24]:<24} {iou:>7} {acc:>7}")
    return "\n".join(lines)
