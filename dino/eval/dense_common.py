"""What the segmentation and depth probes share: frozen-backbone feature maps, the iteration-based head
training loop (poly learning rate with linear warm-up, resumable through an atomic checkpoint, tensorboard
curves, distributed), and the prediction-beside-ground-truth picture.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from dino.distributed import DeviceContext, barrier, get_rank, get_world_size, is_main_process
from dino.errors import UserError
from dino.io import atomic_torch_save, atomic_write
from dino.log import get_logger

logger = get_logger(__name__)


# ------------------------------------------------------------------------------------------ features


def backbone_depth(model: nn.Module) -> int:
    """Number of transformer blocks; the dense probes read ViT patch tokens (not ConvNeXt stages)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "get_intermediate_layers"):
        raise UserError(f"the dense probes need a ViT backbone with transformer blocks; got {type(model).__name__}")
    return len(blocks)


def select_layers(num_blocks: int, num_layers: int, spacing: str = "last") -> list[int]:
    """Block indices (0-based) the head reads.

    last: the last `num_layers` blocks (DINOv2 segmentation "+ms": the last four).  even: evenly spaced,
    ending with the last block (DINOv2 depth "lin. 4": blocks 3, 6, 9, 12 of 12; 5, 12, 18, 24 of 24 and
    10, 20, 30, 40 of 40 — i.e. round(k·depth/4) for k = 1..4, 1-based, with ViT-L's 6 written as 5 in the paper).
    """
    if num_layers < 1:
        raise UserError(f"the head needs at least one layer, got {num_layers}")
    if num_layers > num_blocks:
        raise UserError(f"the head reads {num_layers} layers but the backbone has only {num_blocks} blocks")
    if spacing == "last" or num_layers == 1:
        return list(range(num_blocks - num_layers, num_blocks))
    if spacing == "even":
        if num_blocks == 24 and num_layers == 4:
            return [4, 11, 17, 23]  # the paper's ViT-L layers {5, 12, 18, 24}
        return [round((k + 1) * num_blocks / num_layers) - 1 for k in range(num_layers)]
    raise ValueError(f"unknown layer spacing {spacing!r}")


def center_pad(images: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Zero-pad height and width to multiples of the patch size, split evenly on both sides (DINOv2's
    CenterPadding); returns the padded batch and (left, right, top, bottom)."""
    height, width = images.shape[-2:]
    pad_h = (multiple - height % multiple) % multiple
    pad_w = (multiple - width % multiple) % multiple
    pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    if pad_h or pad_w:
        images = F.pad(images, pads)
    return images, pads


def uncrop_padding(maps: Tensor, pads: tuple[int, int, int, int]) -> Tensor:
    left, right, top, bottom = pads
    height, width = maps.shape[-2:]
    return maps[..., top : height - bottom, left : width - right]


@torch.no_grad()
def backbone_features(
    model: nn.Module, images: Tensor, layers: Sequence[int], device_ctx: DeviceContext
) -> list[tuple[Tensor, Tensor]]:
    """(patch map (B, D, h, w), [CLS] (B, D)) of the given blocks, through the final norm, in float32.
    `images` must already be padded to a multiple of the patch size."""
    with device_ctx.autocast():
        outputs = model.get_intermediate_layers(images, list(layers), reshape=True, return_class_token=True, norm=True)
    return [(patch.float(), cls.float()) for patch, cls in outputs]


def patch_size_of(model: nn.Module) -> int:
    size = getattr(model, "patch_size", None)
    if size is None and hasattr(model, "patch_embed"):
        size = getattr(model.patch_embed, "patch_size", 16)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# --------------------------------------------------------------------------------------- schedule


def poly_lr(
    base_lr: float,
    iteration: int,
    max_iters: int,
    warmup_iters: int = 0,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    min_lr: float = 0.0,
) -> float:
    """mmcv's `poly` policy with linear warm-up (by iteration): (base − min)(1 − t/T)^power + min, and during
    the first `warmup_iters` that value × (1 − (1 − t/warmup)(1 − warmup_ratio))."""
    progress = min(iteration, max_iters) / max(max_iters, 1)
    lr = (base_lr - min_lr) * (1 - progress) ** power + min_lr
    if warmup_iters and iteration < warmup_iters:
        k = (1 - iteration / warmup_iters) * (1 - warmup_ratio)
        lr = lr * (1 - k)
    return lr


def one_cycle_lr(
    max_lr: float,
    iteration: int,
    max_iters: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> float:
    """mmcv's `OneCycle` policy (cosine, two phases, by iteration): max_lr/div_factor → max_lr over the first
    `pct_start` of the run, then → max_lr/div_factor/final_div_factor."""
    initial = max_lr / div_factor
    final = initial / final_div_factor
    peak_step = float(pct_start * max_iters) - 1
    iteration = min(iteration, max_iters - 1)

    def cos(start: float, end: float, factor: float) -> float:
        return end + 0.5 * (start - end) * (math.cos(math.pi * factor) + 1)

    if iteration <= peak_step:
        return cos(initial, max_lr, iteration / peak_step if peak_step > 0 else 1.0)
    return cos(max_lr, final, (iteration - peak_step) / max(max_iters - 1 - peak_step, 1e-12))


@dataclass
class HeadTraining:
    """Iteration-based schedule of a dense head (the preset's `train` section)."""

    iterations: int
    batch_size_per_device: int
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    warmup_iters: int
    warmup_ratio: float
    power: float
    min_lr: float
    num_workers: int
    checkpoint_every: int
    eval_every: int
    log_every: int
    seed: int
    resume: bool
    schedule: str  # poly (with linear warm-up) | one_cycle
    pct_start: float  # one_cycle
    div_factor: float  # one_cycle
    final_div_factor: float  # one_cycle
    grad_clip: float  # max global gradient norm of the head (0: none)
    extra: dict = field(default_factory=dict)

    def lr_at(self, iteration: int) -> float:
        if self.schedule == "poly":
            return poly_lr(
                self.lr, iteration, self.iterations, self.warmup_iters, self.warmup_ratio, self.power, self.min_lr
            )
        if self.schedule == "one_cycle":
            return one_cycle_lr(
                self.lr, iteration, self.iterations, self.pct_start, self.div_factor, self.final_div_factor
            )
        raise UserError(f"train.schedule must be poly or one_cycle, got {self.schedule!r}")


def training_from_config(train_cfg) -> HeadTraining:
    """A preset's `train` section as `HeadTraining` (every key is in the preset: the defaults live in the YAML)."""
    return HeadTraining(
        iterations=int(train_cfg.iterations),
        batch_size_per_device=int(train_cfg.batch_size_per_device),
        lr=float(train_cfg.lr),
        weight_decay=float(train_cfg.weight_decay),
        betas=tuple(float(b) for b in train_cfg.betas),
        warmup_iters=int(train_cfg.warmup_iters),
        warmup_ratio=float(train_cfg.warmup_ratio),
        power=float(train_cfg.power),
        min_lr=float(train_cfg.min_lr),
        num_workers=int(train_cfg.num_workers),
        checkpoint_every=int(train_cfg.checkpoint_every),
        eval_every=int(train_cfg.eval_every),
        log_every=int(train_cfg.log_every),
        seed=int(train_cfg.seed),
        resume=bool(train_cfg.resume),
        schedule=str(train_cfg.schedule),
        pct_start=float(train_cfg.pct_start),
        div_factor=float(train_cfg.div_factor),
        final_div_factor=float(train_cfg.final_div_factor),
        grad_clip=float(train_cfg.grad_clip or 0.0),
    )


def infinite_batches(
    dataset: Dataset, training: HeadTraining, device_ctx: DeviceContext, start_iteration: int
) -> Iterator[tuple]:
    """Batches forever: each rank its DistributedSampler shard, reshuffled (and re-augmented) per pass; a
    resumed run continues with the pass the interrupted one was in, at its position in the pass."""
    sampler = DistributedSampler(
        dataset,
        num_replicas=get_world_size(),
        rank=get_rank(),
        shuffle=True,
        seed=training.seed,
        drop_last=len(dataset) >= get_world_size(),
    )
    loader = DataLoader(
        dataset,
        batch_size=training.batch_size_per_device,
        sampler=sampler,
        drop_last=False,
        num_workers=min(training.num_workers, os.cpu_count() or 1),
        pin_memory=device_ctx.pin_memory,
        persistent_workers=False,
    )
    steps = len(loader)
    if steps == 0:
        raise UserError("the training set is empty")
    epoch, skip = divmod(start_iteration, steps)
    while True:
        sampler.set_epoch(epoch)
        if hasattr(dataset, "epoch"):
            dataset.epoch = epoch
        for index, batch in enumerate(loader):
            if index < skip:
                continue
            yield batch
        skip = 0
        epoch += 1


# ------------------------------------------------------------------------------------- checkpoints


def save_head_checkpoint(
    path: str, head: nn.Module, optimizer: torch.optim.Optimizer, iteration: int, signature: dict, history: list[dict]
) -> None:
    atomic_torch_save(
        dict(
            head=head.state_dict(),
            optimizer=optimizer.state_dict(),
            iteration=iteration,
            signature=signature,
            history=history,
        ),
        path,
    )


def load_head_checkpoint(
    path: str, head: nn.Module, optimizer: torch.optim.Optimizer, signature: dict
) -> tuple[int, list[dict]]:
    """Restore a checkpoint of the same probe (same signature); returns (iteration, history)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"cannot read {path} to resume ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            "delete it or pass train.resume=false"
        ) from None
    stored = state.get("signature", {})
    if stored != signature:
        differing = sorted(k for k in set(stored) | set(signature) if stored.get(k) != signature.get(k))
        raise UserError(
            f"{path} belongs to a different probe ({', '.join(differing)} differ); use another --output_dir, "
            "delete the checkpoint, or pass train.resume=false"
        )
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["iteration"]), list(state.get("history", []))


def summary_writer(output_dir: str, purge_step: int | None):
    if not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter  # slow import: only when needed

    return SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=purge_step)


def train_head(
    head: nn.Module,
    train_set: Dataset,
    training: HeadTraining,
    device_ctx: DeviceContext,
    output_dir: str,
    checkpoint_name: str,
    signature: dict,
    loss_fn: Callable[[nn.Module, tuple, int], Tensor],
    evaluate_fn: Callable[[int, object], dict] | None = None,
    desc: str = "train",
) -> tuple[int, list[dict], object]:
    """AdamW + the schedule of `training` (poly or one-cycle) over `training.iterations`; returns (iterations done, eval history, writer).

    `loss_fn(trained_head, batch, iteration)` → scalar loss; `evaluate_fn(iteration, writer)` → metrics dict (every
    `eval_every` iterations when > 0).  Rank 0 writes `<output_dir>/<checkpoint_name>` every
    `checkpoint_every` iterations and at the end; a run started again with the same folder resumes from it.
    """
    if training.iterations < 0:
        raise UserError(f"train.iterations must be non-negative, got {training.iterations}")
    os.makedirs(output_dir, exist_ok=True)
    optimizer = torch.optim.AdamW(
        head.parameters(), lr=training.lr, betas=tuple(training.betas), weight_decay=training.weight_decay
    )
    checkpoint_path = os.path.join(output_dir, checkpoint_name)
    start, history = 0, []
    if training.resume and os.path.isfile(checkpoint_path):
        start, history = load_head_checkpoint(checkpoint_path, head, optimizer, signature)
        logger.info(f"resuming the head from {checkpoint_path} at iteration {start}")
    trained: nn.Module = head
    if get_world_size() > 1:
        device_ids = [device_ctx.device.index] if device_ctx.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(head, device_ids=device_ids)
    writer = summary_writer(output_dir, purge_step=start or None)
    if start >= training.iterations:
        return start, history, writer
    batches = infinite_batches(train_set, training, device_ctx, start)
    progress = tqdm(
        range(start, training.iterations),
        desc=desc,
        disable=not is_main_process(),
        dynamic_ncols=True,
        leave=False,
        initial=start,
        total=training.iterations,
    )
    trained.train()
    for iteration in progress:
        lr = training.lr_at(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_fn(trained, next(batches), iteration)
        if not torch.isfinite(loss):
            raise UserError(
                f"the head's loss is {float(loss)} at iteration {iteration}; lower train.lr and run again "
                f"(the run resumes from {checkpoint_path} if one was written)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if training.grad_clip > 0:
            nn.utils.clip_grad_norm_(head.parameters(), training.grad_clip)
        optimizer.step()
        device_ctx.mark_step()
        done = iteration + 1
        if writer is not None and (done % max(training.log_every, 1) == 0 or done == training.iterations):
            writer.add_scalar("train/loss", float(loss.detach()), done)
            writer.add_scalar("train/lr", lr, done)
            progress.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if (
            evaluate_fn is not None
            and training.eval_every > 0
            and done % training.eval_every == 0
            and done < training.iterations
        ):
            metrics = evaluate_fn(done, writer)
            history.append(dict(iteration=done, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
            trained.train()
        if done % max(training.checkpoint_every, 1) == 0 or done == training.iterations:
            if is_main_process():
                save_head_checkpoint(checkpoint_path, head, optimizer, done, signature, history)
            barrier()
    return training.iterations, history, writer


def log_scalars(writer, prefix: str, metrics: dict, step: int) -> None:
    if writer is None:
        return
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{key}", value, step)


# ----------------------------------------------------------------------------------------- pictures


def picture_grid(rows: Sequence[Sequence[np.ndarray]], padding: int = 4, height: int = 160) -> Image.Image:
    """Rows of (H, W, 3) uint8 panels (e.g. image | ground truth | prediction), each scaled to `height`."""
    scaled_rows = []
    for row in rows:
        panels = []
        for panel in row:
            picture = Image.fromarray(panel)
            width = max(1, round(picture.width * height / max(picture.height, 1)))
            panels.append(picture.resize((width, height), Image.NEAREST))
        scaled_rows.append(panels)
    total_w = max(sum(p.width for p in row) + padding * (len(row) + 1) for row in scaled_rows)
    total_h = len(scaled_rows) * (height + padding) + padding
    canvas = Image.new("RGB", (total_w, total_h), (255, 255, 255))
    for r, row in enumerate(scaled_rows):
        x = padding
        for panel in row:
            canvas.paste(panel, (x, padding + r * (height + padding)))
            x += panel.width + padding
    return canvas


def save_picture(picture: Image.Image, path: str, writer=None, tag: str = "", step: int = 0) -> None:
    """PNG through the atomic writer, and the same picture in tensorboard."""
    with atomic_write(path) as handle:
        picture.save(handle, format="PNG")
    if writer is not None:
        writer.add_image(tag, np.asarray(picture).transpose(2, 0, 1), step)


def colorize_depth(depth: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Depth (H, W) → (H, W, 3) uint8 through the package's viridis map; 0 / invalid = black."""
    from dino.eval.visualization import colorize

    rgb = np.asarray(colorize(np.where(depth > 0, depth, vmin), "viridis", vmin=vmin, vmax=vmax)).copy()
    rgb[~(depth > 0)] = 0
    return rgb


def json_safe(value):
    """JSON has no NaN: null in its place (a class absent from truth and prediction has IoU NaN)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def frozen_backbone_for_probe(cfg) -> tuple[HeadTraining, DeviceContext, nn.Module, list[int]]:
    """What both dense probes start from: the head-training settings, the device (process group joined), the
    frozen backbone loaded through the one loader, and the blocks the head reads; the head's init seeded."""
    from dino.distributed import init_distributed
    from dino.eval.features import load_eval_backbone

    training = training_from_config(cfg.train)
    device_ctx = DeviceContext.create(cfg.device, precision=str(cfg.precision))
    init_distributed(device_ctx.backend)
    model = load_eval_backbone(cfg.model, device_ctx)
    layers = select_layers(backbone_depth(model), int(cfg.head.layers), str(cfg.head.spacing))
    torch.manual_seed(training.seed)
    return training, device_ctx, model, layers


def head_on_device(head: nn.Module, device_ctx: DeviceContext) -> nn.Module:
    """The head on the device, its BatchNorm synchronised across ranks on GPUs (as DINOv2's heads)."""
    if get_world_size() > 1 and device_ctx.type == "cuda":  # SyncBN runs on GPUs only
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    return head.to(device_ctx.device)


def finish_probe(
    output_dir: str, results_name: str, picture_name: str, picture: Image.Image | None, writer, done: int, summary: dict
) -> dict:
    """Rank 0's end of a probe run: the prediction picture (file and tensorboard), the curves closed, and the
    results JSON (`summary` + iterations + picture path) written atomically; returns what was written."""
    picture_path = os.path.join(output_dir, picture_name)
    if picture is not None:
        save_picture(picture, picture_path, writer, "val/predictions", done)
    if writer is not None:
        writer.close()
    summary = dict(summary, iterations=done, picture=picture_path if picture is not None else None)
    from dino.io import atomic_write_json

    path = os.path.join(output_dir, results_name)
    atomic_write_json(path, json_safe(summary), indent=1)
    logger.info(f"results written to {path}")
    return summary
