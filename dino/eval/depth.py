"""Linear monocular depth of a frozen backbone: DINOv2's "lin. 1" and "lin. 4" heads.

    features = for each chosen block, its patch-token map with the [CLS] token concatenated to every patch
               ("lin. 1": the last block; "lin. 4": four evenly spaced blocks, e.g. 3, 6, 9, 12 of 12),
               concatenated, then upsampled ×4 bilinearly
    output   = Conv1×1(BatchNorm(features)):
               classification (the paper): 256 logits per pixel over depth bins spaced uniformly in
               [min_depth, max_depth]; weights = relu(logits) + 0.1, normalised ("linear" normalisation of
               AdaBins); depth = Σ weights · bin centres
               regression: depth = relu(output) + min_depth
    training = SigLoss (scale-invariant log error, λ = 0.15, with its 100-iteration warm-up) + 0.5 × the
               multi-scale log-gradient loss, on pixels with ground truth, at the crop's resolution
    test     = the whole image (KITTI: KB-cropped, pasted back into the full map), averaged with its
               horizontal flip; metrics of `dense_metrics` (depth caps and the dataset's evaluation crop)

Results go to `<output_dir>/depth_results.json`, curves to `<output_dir>/tensorboard`, and a picture of a few
validation images (image | ground truth | prediction) to `<output_dir>/depth_predictions.png`.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dino.distributed import DeviceContext, all_reduce_sum, get_rank, get_world_size, is_main_process
from dino.errors import UserError
from dino.eval import dense_common as common
from dino.eval.dense_data import DepthDataset, DepthTrainAugmentation, denormalize, depth_files
from dino.eval.dense_metrics import DEPTH_METRICS, DepthMetricAccumulator, image_depth_metrics
from dino.log import get_logger

logger = get_logger(__name__)

CHECKPOINT_NAME = "depth_head.pth"
RESULTS_NAME = "depth_results.json"
PICTURE_NAME = "depth_predictions.png"


class LinearDepthHead(nn.Module):
    """BatchNorm + 1×1 conv on the (×`upsample`) concatenated patch (⊕ [CLS]) maps of `num_layers` blocks."""

    def __init__(
        self,
        embed_dim: int,
        num_layers: int,
        min_depth: float,
        max_depth: float,
        classify: bool = True,
        n_bins: int = 256,
        use_cls_token: bool = True,
        upsample: int = 4,
    ):
        super().__init__()
        if not 0 < min_depth < max_depth:
            raise UserError(f"depth range must satisfy 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        channels = embed_dim * num_layers * (2 if use_cls_token else 1)
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.classify, self.use_cls_token, self.upsample = classify, use_cls_token, upsample
        self.bn = nn.BatchNorm2d(channels)
        self.conv_depth = nn.Conv2d(channels, n_bins if classify else 1, kernel_size=1)
        nn.init.normal_(self.conv_depth.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_depth.bias)
        self.register_buffer("bins", torch.linspace(self.min_depth, self.max_depth, n_bins), persistent=False)

    def forward(self, features: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """(B, 1, h·upsample, w·upsample) depth in metres."""
        maps = []
        size = features[0][0].shape[-2:]
        for patch, cls in features:
            if patch.shape[-2:] != size:
                patch = F.interpolate(patch, size=size, mode="bilinear", align_corners=False)
            maps.append(
                torch.cat([patch, cls[:, :, None, None].expand_as(patch)], dim=1) if self.use_cls_token else patch
            )
        x = torch.cat(maps, dim=1)
        if self.upsample > 1:
            x = F.interpolate(x, size=[s * self.upsample for s in size], mode="bilinear", align_corners=False)
        out = self.conv_depth(self.bn(x))
        if self.classify:
            weights = torch.relu(out) + 0.1
            weights = weights / weights.sum(dim=1, keepdim=True)
            return torch.einsum("bkhw,k->bhw", weights, self.bins.to(weights.dtype)).unsqueeze(1)
        return torch.relu(out) + self.min_depth


# -------------------------------------------------------------------------------------------- losses


def sig_loss(pred: Tensor, target: Tensor, warm_up: bool = False, eps: float = 1e-3) -> Tensor:
    """Scale-invariant log loss of AdaBins / the depth toolbox over pixels with ground truth (target > 0):
    g = ln(pred + ε) − ln(target + ε), √(Var(g) + 0.15·mean(g)²); during warm-up √(0.15·mean(g)²)."""
    valid = target > 0
    if not valid.any():
        return pred.sum() * 0.0
    g = torch.log(pred[valid] + eps) - torch.log(target[valid] + eps)
    if warm_up:
        return torch.sqrt(0.15 * g.mean() ** 2)
    variance = g.var() if g.numel() > 1 else g.new_zeros(())
    return torch.sqrt(variance + 0.15 * g.mean() ** 2)


def gradient_loss(pred: Tensor, target: Tensor, scales: int = 4, eps: float = 1e-3) -> Tensor:
    """Multi-scale log-depth gradient matching (MegaDepth; the toolbox's GradientLoss): at strides 1, 2, 4, 6,
    the mean over valid pixels of |Δ₂ (ln pred − ln target)| vertically and horizontally (neighbours two apart)."""
    total = pred.new_zeros(())
    for level in range(scales):
        step = 1 if level == 0 else 2 * level
        p, t = pred[..., ::step, ::step], target[..., ::step, ::step]
        mask = (t > 0).to(p.dtype)
        count = mask.sum()
        if count == 0:
            continue
        diff = (torch.log(p + eps) - torch.log(t.clamp_min(0) + eps)) * mask
        vertical = (diff[..., :-2, :] - diff[..., 2:, :]).abs() * mask[..., :-2, :] * mask[..., 2:, :]
        horizontal = (diff[..., :, :-2] - diff[..., :, 2:]).abs() * mask[..., :, :-2] * mask[..., :, 2:]
        total = total + (vertical.sum() + horizontal.sum()) / count
    return total


# -------------------------------------------------------------------------------------------- probe


class DepthProbe:
    def __init__(self, model: nn.Module, head: LinearDepthHead, layers: Sequence[int], device_ctx: DeviceContext):
        self.model, self.head, self.layers, self.device_ctx = model, head, list(layers), device_ctx
        self.patch_size = common.patch_size_of(model)

    def depth(self, images: Tensor, head: nn.Module | None = None) -> Tensor:
        """(B, 1, H, W) depth at the size of `images`."""
        padded, pads = common.center_pad(images, self.patch_size)
        features = common.backbone_features(self.model, padded, self.layers, self.device_ctx)
        depth = (head or self.head)(features)
        depth = F.interpolate(depth, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return common.uncrop_padding(depth, pads)

    @torch.no_grad()
    def predict(self, image: Tensor, box: Sequence[int], full_size: Sequence[int], flip: bool = True) -> Tensor:
        """Depth (H, W) at the ground truth's full size: the (KB-cropped) image and, with `flip`, its mirror
        averaged, clamped to the depth range and pasted at `box` (top, left, bottom, right) into zeros."""
        image = image.unsqueeze(0).to(self.device_ctx.device)
        depth = self.depth(image)
        if flip:
            depth = (depth + self.depth(image.flip(-1)).flip(-1)) / 2
        depth = depth.clamp(self.head.min_depth, self.head.max_depth)[0, 0].cpu()
        full = torch.zeros(tuple(int(s) for s in full_size))
        top, left, bottom, right = (int(v) for v in box)
        full[top:bottom, left:right] = depth
        return full


@torch.no_grad()
def evaluate_depth(
    probe: DepthProbe, dataset: DepthDataset, crop: str, flip: bool, desc: str = "val", num_workers: int = 0
) -> dict:
    """Per-image metrics averaged over the validation images (each rank a strided shard, summed across ranks)."""
    was_training = probe.head.training
    probe.head.eval()
    indices = list(range(get_rank(), len(dataset), get_world_size()))
    loader = DataLoader(
        Subset(dataset, indices), batch_size=None, shuffle=False, num_workers=min(num_workers, os.cpu_count() or 1)
    )
    accumulator = DepthMetricAccumulator()
    for image, depth, box, _ in tqdm(loader, desc=desc, disable=not is_main_process(), dynamic_ncols=True, leave=False):
        prediction = probe.predict(image, box.tolist(), depth.shape, flip)
        top, left, bottom, right = box.tolist()
        # outside the KB crop nothing is predicted: those pixels are left out (as the crops used exclude them)
        gt = depth.clone()
        outside = torch.ones_like(gt, dtype=torch.bool)
        outside[top:bottom, left:right] = False
        gt[outside] = 0
        accumulator.add(image_depth_metrics(prediction, gt, probe.head.min_depth, probe.head.max_depth, crop))
        probe.device_ctx.mark_step()
    totals = accumulator.totals().to(probe.device_ctx.device)
    all_reduce_sum(totals)
    probe.head.train(was_training)
    return DepthMetricAccumulator.summary(totals.cpu())


@torch.no_grad()
def prediction_picture(probe: DepthProbe, dataset: DepthDataset, count: int, flip: bool):
    rows = []
    probe.head.eval()
    for index in range(min(count, len(dataset))):
        image, depth, box, _ = dataset[index]
        prediction = probe.predict(image, box.tolist(), depth.shape, flip).numpy()
        gt = depth.numpy()
        top, left, bottom, right = box.tolist()
        vmax = float(max(gt.max(), prediction.max(), probe.head.min_depth * 2))
        rows.append(
            [
                denormalize(image),
                common.colorize_depth(gt[top:bottom, left:right], 0.0, vmax),
                common.colorize_depth(prediction[top:bottom, left:right], 0.0, vmax),
            ]
        )
    return common.picture_grid(rows) if rows else None


def run_depth(cfg) -> dict:
    """`eval_depth.py`: datasets, frozen backbone, head training, whole-image test, results."""
    if cfg.dataset not in cfg.datasets:
        raise UserError(f"unknown depth dataset {cfg.dataset!r}; choose one of {', '.join(cfg.datasets)}")
    settings = cfg.datasets[cfg.dataset]
    min_depth = float(cfg.min_depth if cfg.min_depth is not None else settings.min_depth)
    max_depth = float(cfg.max_depth if cfg.max_depth is not None else settings.max_depth)
    eval_crop = str(cfg.eval_crop if cfg.eval_crop else settings.eval_crop)
    if eval_crop not in ("none", "nyu", "eigen", "garg"):
        raise UserError(f"--eval_crop must be none, nyu, eigen or garg, got {eval_crop!r}")
    crop_size = [int(v) for v in (cfg.crop_size or settings.crop_size)]
    if cfg.head.loss not in ("classification", "regression"):
        raise UserError(f"head.loss must be classification or regression, got {cfg.head.loss!r}")
    files_train = depth_files(cfg.dataset, cfg.data_path, "train")
    files_val = depth_files(cfg.dataset, cfg.data_path, "val")
    training, device_ctx, model, layers = common.frozen_backbone_for_probe(cfg)
    head = LinearDepthHead(
        model.embed_dim,
        len(layers),
        min_depth,
        max_depth,
        classify=cfg.head.loss == "classification",
        n_bins=int(cfg.head.n_bins),
        use_cls_token=bool(cfg.head.use_cls_token),
        upsample=int(cfg.head.upsample),
    )
    head = common.head_on_device(head, device_ctx)
    probe = DepthProbe(model, head, layers, device_ctx)
    augmentation = DepthTrainAugmentation(
        crop_size=tuple(crop_size),
        nyu_crop=cfg.dataset == "nyu",
        rotate_degree=float(settings.rotate_degree),
        brightness_range=tuple(float(b) for b in settings.brightness_range),
        color_prob=float(settings.color_prob),
    )
    train_set = DepthDataset(files_train, augmentation, seed=training.seed)
    val_set = DepthDataset(files_val)
    flip = bool(cfg.test.flip)
    global_batch = training.batch_size_per_device * get_world_size()
    protocol = dict(
        dataset=cfg.dataset,
        checkpoint=cfg.model.pretrained_weights or "official release",
        head=cfg.protocol,
        layers=[i + 1 for i in layers],
        output=f"{cfg.head.loss} ({int(cfg.head.n_bins)} bins)" if cfg.head.loss == "classification" else "regression",
        depth_range=[min_depth, max_depth],
        eval_crop=eval_crop,
        train_crop=crop_size,
        iterations=training.iterations,
        global_batch_size=global_batch,
        optimizer=f"AdamW lr {training.lr:g} wd {training.weight_decay:g}, {training.schedule}",
        test_flip=flip,
    )
    logger.info(
        f"depth probe ({cfg.protocol}): {len(train_set)} train / {len(val_set)} val images; "
        + "; ".join(f"{k}={v}" for k, v in protocol.items())
    )
    signature = dict(
        dataset=cfg.dataset,
        layers=layers,
        embed_dim=int(model.embed_dim),
        loss=str(cfg.head.loss),
        n_bins=int(cfg.head.n_bins),
        depth_range=[min_depth, max_depth],
        iterations=training.iterations,
    )
    warmup = int(cfg.head.sigloss_warmup_iters)
    gradient_weight = float(cfg.head.gradient_loss_weight)

    def loss_fn(trained_head: nn.Module, batch, iteration: int) -> Tensor:
        images, depths = batch
        images = images.to(device_ctx.device, non_blocking=True)
        depths = depths.to(device_ctx.device, non_blocking=True).unsqueeze(1)
        pred = probe.depth(images, head=trained_head)
        loss = sig_loss(pred, depths, warm_up=iteration < warmup)
        if gradient_weight:
            loss = loss + gradient_weight * gradient_loss(pred, depths)
        return loss

    def evaluate_fn(iteration: int, writer) -> dict:
        metrics = evaluate_depth(probe, val_set, eval_crop, flip, f"val at {iteration}", training.num_workers)
        common.log_scalars(writer, "val", metrics, iteration)
        logger.info(
            f"iteration {iteration}: RMSE {metrics['rmse']:.4f}, abs rel {metrics['abs_rel']:.4f}, "
            f"δ1 {metrics['a1']:.4f}"
        )
        return metrics

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
        desc="depth head",
    )
    metrics = evaluate_depth(probe, val_set, eval_crop, flip, "final val", training.num_workers)
    common.log_scalars(writer, "val", metrics, done)
    if not is_main_process():
        return {}
    picture = prediction_picture(probe, val_set, int(cfg.num_pictures), flip)
    logger.info(
        "  ".join(f"{name} {metrics[name]:.4f}" for name in DEPTH_METRICS)
        + f"  ({files_val.name} test, {metrics['num_images']} images)"
    )
    summary = dict(protocol=protocol, num_train=len(train_set), num_val=len(val_set), history=history, **metrics)
    return common.finish_probe(cfg.output_dir, RESULTS_NAME, PICTURE_NAME, picture, writer, done, summary)
