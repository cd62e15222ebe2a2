"""Linear probing of a frozen backbone: the DINOv2 protocol, with DINO v1's flags.

A grid of linear classifiers is trained **at once**, in one pass over the data (DINOv2 `eval/linear.py`):
the backbone runs once per batch, and every classifier reads its own input from the same block outputs.

    grid = learning rates × {last 1, last 4 blocks' [CLS]} × {without, with average-pooled patch tokens}
    input  = concat(CLS of the last n blocks) (‖ mean of the last block's patch tokens)   (`multiblock_feature`)
    logits = W·input + b,   W ~ N(0, 0.01²), b = 0
    loss   = Σ_classifiers cross-entropy     (the classifiers share no parameters, so each gets its own gradient)

SGD with momentum 0.9 and no weight decay; each classifier's lr = base lr × global batch / 256 (the linear
scaling rule of DINO v1 and DINOv2), following a cosine from that value to 0 over all iterations.
Training images: RandomResizedCrop + horizontal flip; evaluation: resize + centre crop.  The classifier
with the best val top-1 is reported with its settings.  DINO v1's `--lr`, `--n_last_blocks`,
`--avgpool_patchtokens` restrict the grid to the given values.

After every epoch rank 0 writes `linear_checkpoint.pth` (atomically): classifiers, optimiser, epoch and
the grid they belong to; a run started again with the same output folder resumes from it.  Curves go to
`<output_dir>/tensorboard`, results to `<output_dir>/linear_results.json`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from dino.data.transforms import make_eval_transform, make_linear_train_transform
from dino.distributed import (
    DeviceContext,
    all_reduce_sum,
    barrier,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from dino.errors import UserError
from dino.eval import features as feats
from dino.eval.accuracy import topk_hits
from dino.eval.checkpointing import atomic_torch_save, write_json_atomic
from dino.eval.features import get_block_tokens, multiblock_feature, multiblock_feature_dim, shard_indices
from dino.log import get_logger

logger = get_logger(__name__)

CHECKPOINT_NAME = "linear_checkpoint.pth"
RESULTS_NAME = "linear_results.json"


# ----------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class ProbeSetting:
    """One classifier of the grid: its input (last n blocks, pooled patches or not) and its base lr."""

    n_last_blocks: int
    avgpool_patchtokens: bool
    lr: float

    @property
    def name(self) -> str:
        return f"blocks{self.n_last_blocks}_avgpool{'T' if self.avgpool_patchtokens else 'F'}_lr{self.lr:g}"


def settings_for_backbone(settings: Sequence[ProbeSetting], model: nn.Module) -> list[ProbeSetting]:
    """The grid a backbone can feed: a ConvNeXt (no `blocks`) has stages of different widths, and its [CLS] is
    the pooled last stage, so only `n_last_blocks` 1 applies (the others are folded into it, and that is said)."""
    if hasattr(model, "blocks") or all(s.n_last_blocks == 1 for s in settings):
        return list(settings)
    if is_main_process():
        logger.info(
            "ConvNeXt backbone: linear probes on the last stage only (n_last_blocks 1); its stages differ in width"
        )
    return list(dict.fromkeys(replace(s, n_last_blocks=1) for s in settings))


def probe_grid(
    learning_rates: Sequence[float], n_last_blocks: Sequence[int], avgpool_patchtokens: Sequence[bool]
) -> list[ProbeSetting]:
    """All combinations, grouped by input (so classifiers reading the same input sit together)."""
    if not learning_rates or not n_last_blocks or not avgpool_patchtokens:
        raise UserError("the linear grid needs at least one learning rate, one n_last_blocks and one avgpool setting")
    for lr in learning_rates:
        if not lr > 0:
            raise UserError(f"learning rates must be positive, got {lr}")
    for n in n_last_blocks:
        if int(n) < 1:
            raise UserError(f"n_last_blocks must be at least 1, got {n}")
    return [
        ProbeSetting(int(n), bool(pool), float(lr))
        for n in dict.fromkeys(n_last_blocks)
        for pool in dict.fromkeys(avgpool_patchtokens)
        for lr in dict.fromkeys(learning_rates)
    ]


def scale_lr(base_lr: float, global_batch_size: int) -> float:
    """Linear scaling rule (DINO v1 and DINOv2 linear eval): lr = base_lr · global batch / 256."""
    return base_lr * global_batch_size / 256.0


def cosine_factor(iteration: int, total_iterations: int) -> float:
    """½(1 + cos(π t / T)): 1 at the first iteration, → 0 at the last (torch's CosineAnnealingLR, eta_min 0)."""
    return 0.5 * (1.0 + math.cos(math.pi * iteration / max(1, total_iterations)))


class LinearProbeGrid(nn.Module):
    """The classifiers of a grid; `forward(block_tokens)` → one logits tensor per setting (grid order)."""

    def __init__(self, settings: Sequence[ProbeSetting], embed_dim: int, num_classes: int):
        super().__init__()
        self.settings = list(settings)
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.classifiers = nn.ModuleList()
        for setting in self.settings:
            layer = nn.Linear(
                multiblock_feature_dim(embed_dim, setting.n_last_blocks, setting.avgpool_patchtokens), num_classes
            )
            # DINO v1 / DINOv2 LinearClassifier init
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            nn.init.zeros_(layer.bias)
            self.classifiers.append(layer)

    @property
    def max_blocks(self) -> int:
        """How many of the last blocks the backbone must return for this grid."""
        return max(s.n_last_blocks for s in self.settings)

    def forward(self, block_tokens: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
        inputs: dict[tuple[int, bool], Tensor] = {}
        logits = []
        for setting, classifier in zip(self.settings, self.classifiers):
            key = (setting.n_last_blocks, setting.avgpool_patchtokens)
            if key not in inputs:
                inputs[key] = multiblock_feature(block_tokens, *key)
            logits.append(classifier(inputs[key]))
        return logits


def best_classifier(val_results: Sequence[dict]) -> int:
    """Index of the highest val top-1 (the first of equals, i.e. grid order decides ties)."""
    return max(range(len(val_results)), key=lambda i: (val_results[i]["top1"], -i))


# ------------------------------------------------------------------------------------- training parts


@dataclass
class LinearTrainingSettings:
    """How the grid is trained (configs/eval/linear.yaml, section `linear`, plus the data loader; the defaults live
    there only)."""

    epochs: int
    batch_size_per_device: int
    num_workers: int
    momentum: float
    weight_decay: float
    val_every_epochs: int
    seed: int
    resume: bool


@torch.no_grad()
def backbone_tokens(
    model: nn.Module, images: Tensor, n_blocks: int, device_ctx: DeviceContext
) -> list[tuple[Tensor, Tensor]]:
    """Block outputs of the frozen backbone (autocast as configured), in float32 for the classifiers."""
    with device_ctx.autocast():
        tokens = get_block_tokens(model, images, n_blocks)
    return [(patch.float(), cls.float()) for patch, cls in tokens]


def _classifier_grid(grid: nn.Module) -> LinearProbeGrid:
    """The grid inside a DistributedDataParallel wrapper (or the grid itself)."""
    return grid.module if isinstance(grid, nn.parallel.DistributedDataParallel) else grid


def make_optimizer(
    grid: LinearProbeGrid, global_batch_size: int, momentum: float, weight_decay: float
) -> torch.optim.SGD:
    """SGD with one parameter group per classifier, at its scaled lr (`initial_lr` keeps the peak value)."""
    groups = []
    for setting, classifier in zip(grid.settings, grid.classifiers):
        peak = scale_lr(setting.lr, global_batch_size)
        groups.append(dict(params=list(classifier.parameters()), lr=peak, initial_lr=peak))
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, weight_decay=weight_decay)


def set_learning_rates(optimizer: torch.optim.Optimizer, iteration: int, total_iterations: int) -> float:
    """Cosine schedule of every group from its peak; computed from the iteration, so a resume is exact."""
    factor = cosine_factor(iteration, total_iterations)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return factor


@torch.no_grad()
def evaluate_probes(
    model: nn.Module,
    grid: LinearProbeGrid,
    dataset: Dataset,
    device_ctx: DeviceContext,
    batch_size: int,
    num_workers: int,
    desc: str = "val",
) -> list[dict]:
    """Top-1 / top-5 (%) of every classifier on `dataset` (top-5 None below 5 classes); each rank scores a
    strided shard and the counts are summed across ranks."""
    grid = _classifier_grid(grid)
    was_training = grid.training
    grid.eval()
    indices = shard_indices(len(dataset), get_rank(), get_world_size(), pad=False)
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=min(num_workers, os.cpu_count() or 1),
        pin_memory=device_ctx.pin_memory,
    )
    num_top = min(5, grid.num_classes)
    # rows: classifiers; columns: top-1 hits, top-5 hits, images
    counts = torch.zeros(len(grid.settings), 3, dtype=torch.float64, device=device_ctx.device)
    for images, labels in tqdm(loader, desc=desc, disable=not is_main_process(), dynamic_ncols=True, leave=False):
        images = images.to(device_ctx.device, non_blocking=True)
        labels = torch.as_tensor(labels).to(device_ctx.device, non_blocking=True)
        for row, logits in enumerate(grid(backbone_tokens(model, images, grid.max_blocks, device_ctx))):
            counts[row, :2] += topk_hits(logits, labels, (1, num_top))
            counts[row, 2] += len(labels)
        device_ctx.mark_step()
    all_reduce_sum(counts)
    grid.train(was_training)
    counts = counts.cpu()
    return [
        dict(
            name=setting.name,
            **asdict(setting),
            top1=100.0 * float(c[0] / c[2]),
            top5=100.0 * float(c[1] / c[2]) if grid.num_classes >= 5 else None,
        )
        for setting, c in zip(grid.settings, counts)
    ]


# ------------------------------------------------------------------------------------------ checkpoints


def grid_signature(grid: LinearProbeGrid) -> dict:
    """What a checkpoint must match to be resumed: the settings, the class count and the feature width."""
    return dict(settings=[asdict(s) for s in grid.settings], num_classes=grid.num_classes, embed_dim=grid.embed_dim)


def save_linear_checkpoint(
    path: str, grid: LinearProbeGrid, optimizer: torch.optim.Optimizer, epoch: int, history: list[dict]
) -> None:
    """Classifiers, optimiser, completed epochs and val history, written atomically."""
    atomic_torch_save(
        dict(
            classifiers=grid.state_dict(),
            optimizer=optimizer.state_dict(),
            epoch=epoch,
            history=history,
            **grid_signature(grid),
        ),
        path,
    )


def load_linear_checkpoint(
    path: str, grid: LinearProbeGrid, optimizer: torch.optim.Optimizer
) -> tuple[int, list[dict]]:
    """Restore a checkpoint of the same grid; returns (completed epochs, val history).

    A checkpoint of another grid (other lrs, block counts, classes or backbone width) is a UserError
    rather than a silent restart, since resuming it would mix two experiments in one folder.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file is the user's to remove; say which
        raise UserError(
            f"cannot read {path} to resume ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            "delete it or pass linear.resume=false"
        ) from None
    expected = grid_signature(grid)
    stored = {key: state.get(key) for key in expected}
    if stored != expected:
        differing = [key for key in expected if stored[key] != expected[key]]
        raise UserError(
            f"{path} belongs to a different linear probe run ({', '.join(differing)} differ); use another "
            "--output_dir, delete the checkpoint, or pass linear.resume=false"
        )
    grid.load_state_dict(state["classifiers"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), list(state.get("history", []))


# ------------------------------------------------------------------------------------------ training


def _summary_writer(output_dir: str, purge_step: int | None):
    """A tensorboard writer on rank 0 (None elsewhere); `purge_step` drops events a resumed run rewrites."""
    if not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard takes seconds to import

    return SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=purge_step)


def train_linear_probes(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    num_classes: int,
    settings: Sequence[ProbeSetting],
    training: LinearTrainingSettings,
    device_ctx: DeviceContext,
    output_dir: str,
) -> dict:
    """Train the grid on `train_set` with the frozen `model`, evaluate on `val_set`, pick the best.

    `model` must be on `device_ctx.device` and expose `get_intermediate_layers` and `embed_dim`; datasets
    yield (image tensor, label).  Resumes from `<output_dir>/linear_checkpoint.pth` when `training.resume`.
    Returns {best: {...}, classifiers: [...], history: [...], epochs, global_batch_size}.
    """
    if training.epochs < 0:
        raise UserError(f"--epochs must be non-negative, got {training.epochs}")
    os.makedirs(output_dir, exist_ok=True)
    world_size = get_world_size()
    global_batch = training.batch_size_per_device * world_size
    torch.manual_seed(training.seed)  # the same classifier init on every rank and every run
    settings = settings_for_backbone(settings, model)
    grid = LinearProbeGrid(settings, model.embed_dim, num_classes).to(device_ctx.device)
    if hasattr(model, "blocks") and grid.max_blocks > len(model.blocks):
        raise UserError(f"n_last_blocks {grid.max_blocks} exceeds the backbone's {len(model.blocks)} blocks")
    optimizer = make_optimizer(grid, global_batch, training.momentum, training.weight_decay)
    checkpoint_path = os.path.join(output_dir, CHECKPOINT_NAME)
    start_epoch, history = 0, []
    if training.resume and os.path.isfile(checkpoint_path):
        start_epoch, history = load_linear_checkpoint(checkpoint_path, grid, optimizer)
        if is_main_process():
            logger.info(f"resuming the linear probes from {checkpoint_path} after epoch {start_epoch}")

    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=get_rank(), shuffle=True, seed=training.seed)
    loader = DataLoader(
        train_set,
        batch_size=training.batch_size_per_device,
        sampler=sampler,
        drop_last=False,
        num_workers=min(training.num_workers, os.cpu_count() or 1),
        pin_memory=device_ctx.pin_memory,
    )
    steps_per_epoch = len(loader)
    total_iterations = training.epochs * steps_per_epoch
    trained_grid: nn.Module = grid
    if world_size > 1:
        device_ids = [device_ctx.device.index] if device_ctx.type == "cuda" else None
        trained_grid = nn.parallel.DistributedDataParallel(grid, device_ids=device_ids)
    writer = _summary_writer(output_dir, purge_step=start_epoch * steps_per_epoch if start_epoch else None)

    final: list[dict] | None = None  # val results after the last epoch
    for epoch in range(start_epoch, training.epochs):
        sampler.set_epoch(epoch)
        trained_grid.train()
        progress = tqdm(
            loader,
            desc=f"linear epoch {epoch + 1}/{training.epochs}",
            disable=not is_main_process(),
            dynamic_ncols=True,
            leave=False,
        )
        for step, (images, labels) in enumerate(progress):
            iteration = epoch * steps_per_epoch + step
            lr_factor = set_learning_rates(optimizer, iteration, total_iterations)
            images = images.to(device_ctx.device, non_blocking=True)
            labels = torch.as_tensor(labels).to(device_ctx.device, non_blocking=True)
            all_logits = trained_grid(backbone_tokens(model, images, grid.max_blocks, device_ctx))
            losses = torch.stack([F.cross_entropy(logits, labels) for logits in all_logits])
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            device_ctx.mark_step()
            if writer is not None:
                losses = losses.detach()
                mean_loss = float(losses.mean())
                progress.set_postfix(loss=f"{mean_loss:.3f}")
                writer.add_scalar("train/mean_loss", mean_loss, iteration)
                writer.add_scalar("train/min_loss", float(losses.min()), iteration)
                writer.add_scalar("train/lr_factor", lr_factor, iteration)
        last_epoch = epoch + 1 == training.epochs
        if last_epoch or (training.val_every_epochs > 0 and (epoch + 1) % training.val_every_epochs == 0):
            results = evaluate_probes(
                model,
                grid,
                val_set,
                device_ctx,
                training.batch_size_per_device,
                training.num_workers,
                desc=f"val after epoch {epoch + 1}",
            )
            best = results[best_classifier(results)]
            history.append(dict(epoch=epoch + 1, best=best["name"], best_top1=best["top1"]))
            if writer is not None:
                for result in results:
                    writer.add_scalar(f"val_top1/{result['name']}", result["top1"], (epoch + 1) * steps_per_epoch)
                writer.add_scalar("val/best_top1", best["top1"], (epoch + 1) * steps_per_epoch)
            if is_main_process():
                logger.info(f"epoch {epoch + 1}/{training.epochs}: best val top-1 {best['top1']:.2f} ({best['name']})")
            if last_epoch:
                final = results
        if is_main_process():
            save_linear_checkpoint(checkpoint_path, grid, optimizer, epoch + 1, history)
        barrier()
    if writer is not None:
        writer.close()

    if final is None:  # nothing left to train (a finished run resumed, or --epochs 0)
        final = evaluate_probes(
            model, grid, val_set, device_ctx, training.batch_size_per_device, training.num_workers, desc="final val"
        )
    best = final[best_classifier(final)]
    return dict(
        best=dict(best, scaled_lr=scale_lr(best["lr"], global_batch)),
        classifiers=final,
        history=history,
        epochs=training.epochs,
        global_batch_size=global_batch,
    )


def format_probe_table(classifiers: Sequence[dict], best_name: str, limit: int = 10) -> str:
    """The `limit` best classifiers by val top-1, the chosen one marked."""
    ranked = sorted(classifiers, key=lambda r: -r["top1"])[:limit]
    lines = [f"{'classifier':<32}  {'top-1':>7}  {'top-5':>7}"]
    for row in ranked:
        top5 = f"{row['top5']:>7.2f}" if row["top5"] is not None else f"{'-':>7}"
        lines.append(
            f"{row['name']:<32}  {row['top1']:>7.2f}  {top5}" + ("  <- best" if row["name"] == best_name else "")
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the protocol


def _as_list(value: Any) -> list:
    """A config value that may be one item (a DINO v1 flag) or a list (the grid)."""
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]


def grid_from_config(linear_cfg) -> list[ProbeSetting]:
    """The grid of `configs/eval/linear.yaml`: `learning_rates × n_last_blocks × avgpool_patchtokens`."""
    return probe_grid(
        [float(lr) for lr in _as_list(linear_cfg.learning_rates)],
        [int(n) for n in _as_list(linear_cfg.n_last_blocks)],
        [bool(p) for p in _as_list(linear_cfg.avgpool_patchtokens)],
    )


def run_linear(cfg) -> dict:
    """`eval_linear.py` (protocol linear): datasets, frozen backbone, grid training, table, JSON results."""
    if cfg.load_features:
        raise UserError(
            "--load_features works with --protocol logreg only: the linear probes train on augmented images"
        )
    settings = grid_from_config(cfg.linear)
    training = LinearTrainingSettings(
        epochs=int(cfg.linear.epochs),
        batch_size_per_device=int(cfg.data.batch_size_per_device),
        num_workers=int(cfg.data.num_workers),
        momentum=float(cfg.linear.momentum),
        weight_decay=float(cfg.linear.weight_decay),
        val_every_epochs=int(cfg.linear.val_every_epochs),
        seed=int(cfg.linear.seed),
        resume=bool(cfg.linear.resume),
    )
    device_ctx = DeviceContext.create(cfg.device, precision=str(cfg.precision))
    init_distributed(device_ctx.backend)
    data_path = feats.resolve_data_path(cfg.data.data_path)
    sizes = feats.resolve_image_sizes(cfg.data.resize_size, cfg.data.crop_size, feats.demo_image_size(data_path))
    train_set, val_set = feats.build_train_val_datasets(
        data_path, make_linear_train_transform(sizes.crop_size), make_eval_transform(sizes.resize_size, sizes.crop_size)
    )
    model = feats.load_eval_backbone(cfg.model, device_ctx)
    global_batch = training.batch_size_per_device * get_world_size()
    lrs = sorted({s.lr for s in settings})
    protocol = dict(
        checkpoint=cfg.model.pretrained_weights or "official release",
        data_path=data_path,
        train_transform=f"RandomResizedCrop {sizes.crop_size} + flip",
        eval_transform=f"resize {sizes.resize_size} + centre crop {sizes.crop_size}",
        base_learning_rates=lrs,
        lr_scaling="base lr x global batch / 256",
        global_batch_size=global_batch,
        n_last_blocks=sorted({s.n_last_blocks for s in settings}),
        avgpool_patchtokens=sorted({s.avgpool_patchtokens for s in settings}),
        optimizer=f"SGD momentum {training.momentum}, weight decay {training.weight_decay}, cosine to 0",
        epochs=training.epochs,
    )
    if is_main_process():
        logger.info(
            f"linear protocol: {len(settings)} classifiers on {len(train_set)} train / {len(val_set)} val images, "
            f"{len(train_set.classes)} classes; " + "; ".join(f"{k}={v}" for k, v in protocol.items())
        )
    result = train_linear_probes(
        model, train_set, val_set, len(train_set.classes), settings, training, device_ctx, cfg.output_dir
    )
    if not is_main_process():
        return {}
    best = result["best"]
    logger.info(format_probe_table(result["classifiers"], best["name"]))
    top5 = f", top-5 {best['top5']:.2f}" if best["top5"] is not None else ""
    logger.info(
        f"best linear probe: top-1 {best['top1']:.2f}{top5} with the last {best['n_last_blocks']} block(s)' [CLS]"
        f"{' + average-pooled patch tokens' if best['avgpool_patchtokens'] else ''}, base lr {best['lr']:g} "
        f"(scaled {best['scaled_lr']:g})"
    )
    summary = dict(
        protocol=protocol, num_train=len(train_set), num_val=len(val_set), num_classes=len(train_set.classes), **result
    )
    path = os.path.join(cfg.output_dir, RESULTS_NAME)
    write_json_atomic(summary, path)
    logger.info(f"results written to {path}")
    return summary
