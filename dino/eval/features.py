"""Frozen-backbone features for the evaluation protocols (k-NN, linear probes, logistic regression).

`extract_features` runs a model over a dataset in batches and returns one float32 feature row per image,
**in dataset order**, on the CPU.  Under `torchrun` every rank extracts a strided shard
(rank r takes images r, r+W, r+2W, …), the shards are gathered, and each row is written back to the index it
came from, so the result does not depend on the number of processes.

Also here: the multi-block feature of the DINO v1 / DINOv2 linear protocols, saving and loading extracted
features (file names of DINO v1's `eval_knn.py`), and what the eval scripts share: the backbone a config
names, the train/val ImageFolder pair, features from a config (extracted or loaded), and the CLI flags
that set those config keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from dino.data import demo_dataset
from dino.data.datasets import ImageFolderDataset
from dino.data.transforms import make_eval_transform
from dino.distributed import DeviceContext, all_gather_cat, get_rank, get_world_size, is_main_process
from dino.errors import UserError, require_path
from dino.eval.checkpointing import atomic_torch_save, write_json_atomic
from dino.hub import resolve_backbone
from dino.log import get_logger

logger = get_logger(__name__)

FeatureFn = Callable[[nn.Module, Tensor], Tensor]

# File names of DINO v1's `--dump_features` output, so dumps from either code base load in the other.
FEATURE_FILES = {
    "train_features": "trainfeat.pth",
    "train_labels": "trainlabels.pth",
    "test_features": "testfeat.pth",
    "test_labels": "testlabels.pth",
}
FEATURE_META_FILE = "features_meta.json"


# ------------------------------------------------------------------------------------ feature functions


def cls_token_feature(model: nn.Module, images: Tensor) -> Tensor:
    """The backbone's output: the final-LayerNorm [CLS] token, (B, D) — the feature of DINO's k-NN protocol."""
    return model(images)


def get_block_tokens(model: nn.Module, images: Tensor, n_last_blocks: int) -> tuple[tuple[Tensor, Tensor], ...]:
    """(patch tokens (B, N, D), [CLS] (B, D)) of the last `n_last_blocks` blocks, each through the final norm."""
    return model.get_intermediate_layers(images, n_last_blocks, return_class_token=True, norm=True)


def multiblock_feature(
    block_tokens: Sequence[tuple[Tensor, Tensor]], n_last_blocks: int, avgpool_patchtokens: bool
) -> Tensor:
    """Input of a linear probe (DINOv2 `create_linear_input`; DINO v1 `--n_last_blocks --avgpool_patchtokens`).

    feature = concat(CLS_{L-n+1}, …, CLS_L) (‖ mean over patches of the last block's patch tokens, if avgpool),
    a vector of n·D (+ D) values per image.  `block_tokens` holds (patch, cls) pairs of at least the last
    `n_last_blocks` blocks, oldest first (what `get_block_tokens` returns); register tokens are not pooled.
    """
    if n_last_blocks > len(block_tokens):
        raise ValueError(f"asked for the last {n_last_blocks} blocks but only {len(block_tokens)} were computed")
    used = block_tokens[-n_last_blocks:]
    parts = [cls for _, cls in used]
    if avgpool_patchtokens:
        parts.append(used[-1][0].mean(dim=1))
    return torch.cat(parts, dim=-1).float()


def multiblock_feature_dim(embed_dim: int, n_last_blocks: int, avgpool_patchtokens: bool) -> int:
    """Length of `multiblock_feature`: n·D (+ D with average-pooled patch tokens)."""
    return embed_dim * (n_last_blocks + int(avgpool_patchtokens))


# -------------------------------------------------------------------------------------------- sharding


def shard_indices(num_samples: int, rank: int, world_size: int, pad: bool = True) -> list[int]:
    """Dataset indices rank `rank` of `world_size` processes handles: rank, rank+W, rank+2W, …

    With `pad`, every rank gets ceil(N/W) indices (short shards repeat their last index; the duplicate rows
    are written to the same place on reassembly), because `all_gather` needs equally-shaped tensors.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    indices = list(range(rank, num_samples, world_size))
    if pad:
        per_rank = -(-num_samples // world_size)
        filler = indices[-1] if indices else 0
        indices += [filler] * (per_rank - len(indices))
    return indices


def assemble_in_dataset_order(
    features: Tensor, labels: Tensor, indices: Tensor, num_samples: int
) -> tuple[Tensor, Tensor]:
    """Put rows gathered from all ranks back at their dataset index; every index in range must be covered."""
    ordered_features = features.new_empty((num_samples, features.shape[1]))
    ordered_labels = labels.new_full((num_samples,), -1)
    covered = torch.zeros(num_samples, dtype=torch.bool)
    ordered_features[indices] = features
    ordered_labels[indices] = labels
    covered[indices] = True
    if not bool(covered.all()):
        raise RuntimeError(f"{int((~covered).sum())} dataset indices were extracted by no rank")
    return ordered_features, ordered_labels


# -------------------------------------------------------------------------------------------- extraction


class _Unreplaced(Dataset):
    """`dataset[i]` → (image tensor or None, label, readable) over an `ImageListDataset`'s samples.

    The dataset itself replaces an unreadable image by the next readable one (right for training), which in
    an evaluation would count another image, often of another class, in place of the broken one.
    """

    def __init__(self, dataset):
        self.samples = dataset.samples
        self.transform = dataset.transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from dino.data.datasets import CorruptImageError
        from dino.data.transforms import load_image_for, min_decode_side

        path, label = self.samples[index]
        try:  # a huge image is decoded only to the size the eval transform resizes to
            image = load_image_for(path, min_decode_side(self.transform))
        except CorruptImageError:
            return None, label, False
        return (self.transform(image) if self.transform is not None else image), label, True


def _collate_readable(batch):
    images = [image for image, _, ok in batch if ok]
    labels = torch.as_tensor([label for _, label, _ in batch], dtype=torch.long)
    readable = torch.as_tensor([ok for _, _, ok in batch], dtype=torch.bool)
    return (torch.stack(images) if images else None), labels, readable


def _can_skip_unreadable(dataset: Dataset) -> bool:
    return hasattr(dataset, "samples") and hasattr(dataset, "transform")


@torch.no_grad()  # not inference_mode: its tensors could not be used later by autograd (e.g. the log-reg fit)
def _extract_local(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int],
    device_ctx: DeviceContext,
    batch_size: int,
    num_workers: int,
    feature_fn: FeatureFn | None,
    desc: str,
    progress: bool,
    skip_unreadable: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(features, labels, readable mask) of `dataset[i]` for `i` in `indices`; unreadable rows are zeros."""
    feature_fn = feature_fn or cls_token_feature
    skip_unreadable = skip_unreadable and _can_skip_unreadable(dataset)
    source = _Unreplaced(dataset) if skip_unreadable else dataset
    loader = DataLoader(
        Subset(source, list(indices)),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=min(num_workers, os.cpu_count() or 1),
        pin_memory=device_ctx.pin_memory,
        persistent_workers=False,
        **({"collate_fn": _collate_readable} if skip_unreadable else {}),
    )
    features: list[Tensor] = []
    labels: list[Tensor] = []
    readable: list[Tensor] = []
    dim = None
    for batch in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        images, targets = batch[0], batch[1]
        ok = batch[2] if skip_unreadable else torch.ones(len(targets), dtype=torch.bool)
        rows = None
        if images is not None:
            images = images.to(device_ctx.device, non_blocking=True)
            with device_ctx.autocast():
                output = feature_fn(model, images)
            rows = output.float().cpu()
            dim = rows.shape[1]
            device_ctx.mark_step()
        features.append((ok, rows))
        labels.append(torch.as_tensor(targets, dtype=torch.long).cpu())
        readable.append(ok)
    if not features:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.bool)
    if dim is None:
        raise UserError(f"cannot extract {desc}: none of its {len(indices)} images could be read")
    full = []
    for ok, rows in features:  # zero rows where an image was unreadable: equal shapes for the gather
        block = torch.zeros(len(ok), dim)
        if rows is not None:
            block[ok] = rows
        full.append(block)
    return torch.cat(full), torch.cat(labels), torch.cat(readable)


def _extract(model, dataset, device_ctx, batch_size, num_workers, feature_fn, desc, skip_unreadable):
    num_samples = len(dataset)
    if num_samples == 0:
        raise UserError(f"cannot extract {desc}: the dataset is empty")
    rank, world_size = get_rank(), get_world_size()
    indices = shard_indices(num_samples, rank, world_size, pad=True)
    features, labels, readable = _extract_local(
        model,
        dataset,
        indices,
        device_ctx,
        batch_size,
        num_workers,
        feature_fn,
        desc,
        is_main_process(),
        skip_unreadable,
    )
    if world_size == 1:
        return features, labels, readable
    # the process group may be NCCL, which gathers device tensors only
    device = device_ctx.device
    gathered_features = all_gather_cat(features.to(device)).cpu()
    gathered_labels = all_gather_cat(labels.to(device)).cpu()
    gathered_readable = all_gather_cat(readable.to(device, torch.long)).cpu()
    gathered_indices = all_gather_cat(torch.as_tensor(indices, dtype=torch.long, device=device)).cpu()
    ordered_features, ordered_labels = assemble_in_dataset_order(
        gathered_features, gathered_labels, gathered_indices, num_samples
    )
    ordered_readable = torch.zeros(num_samples, dtype=torch.long)
    ordered_readable[gathered_indices] = gathered_readable
    return ordered_features, ordered_labels, ordered_readable.bool()


def extract_features(
    model: nn.Module,
    dataset: Dataset,
    device_ctx: DeviceContext,
    batch_size: int = 64,
    num_workers: int = 2,
    feature_fn: FeatureFn | None = None,
    desc: str = "features",
) -> tuple[Tensor, Tensor]:
    """Features (N, D) float32 and labels (N,) int64 of a whole dataset, on the CPU, in dataset order.

    feature_fn(model, images) → (B, D) tensor; default: the normalised [CLS] token (`model(images)`).  Runs
    under `torch.no_grad` and the context's autocast (precision bf16 / fp16); the model must already sit
    on `device_ctx.device`.  Distributed: each rank extracts `shard_indices(N, rank, W)`, then every rank
    receives the full, ordered result.  The progress bar shows on rank 0 only.
    """
    features, labels, _ = _extract(model, dataset, device_ctx, batch_size, num_workers, feature_fn, desc, False)
    return features, labels


def extract_readable_features(
    model: nn.Module,
    dataset: Dataset,
    device_ctx: DeviceContext,
    batch_size: int = 64,
    num_workers: int = 2,
    feature_fn: FeatureFn | None = None,
    desc: str = "features",
) -> tuple[Tensor, Tensor, list[int]]:
    """As `extract_features`, but an unreadable image is left out instead of replaced by its neighbour.

    Returns (features, labels) of the readable images in dataset order and the dataset indices that were
    skipped, so an evaluation counts only images it actually saw, each with its own label.  Datasets that
    do not expose `samples` and `transform` (not an `ImageListDataset`) are read as they are.
    """
    features, labels, readable = _extract(model, dataset, device_ctx, batch_size, num_workers, feature_fn, desc, True)
    skipped = torch.nonzero(~readable).flatten().tolist()
    if skipped:
        features, labels = features[readable], labels[readable]
    return features, labels, skipped


# ------------------------------------------------------------------------------------------ dump / load


def dump_features(
    directory: str | os.PathLike,
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    meta: dict | None = None,
) -> None:
    """Save features as DINO v1 does (`trainfeat.pth`, `trainlabels.pth`, `testfeat.pth`, `testlabels.pth`).

    `meta` (e.g. class names, checkpoint) goes to `features_meta.json` next to them.  Every file is written
    atomically, so an interrupted dump never leaves a truncated file under the real name.
    """
    tensors = dict(
        train_features=train_features, train_labels=train_labels, test_features=test_features, test_labels=test_labels
    )
    for name, tensor in tensors.items():
        atomic_torch_save(tensor.detach().cpu(), os.path.join(directory, FEATURE_FILES[name]))
    if meta is not None:
        write_json_atomic(meta, os.path.join(directory, FEATURE_META_FILE))


def load_features(directory: str | os.PathLike) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train_features, train_labels, test_features, test_labels) from a `dump_features` folder (ours or DINO v1's)."""
    directory = require_path(directory, "--load_features folder", must_be_dir=True)
    missing = [f for f in FEATURE_FILES.values() if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise UserError(
            f"--load_features folder {directory} lacks {', '.join(missing)} "
            f"(expected the files written by --dump_features: {', '.join(FEATURE_FILES.values())})"
        )
    loaded = []
    for name in ("train_features", "train_labels", "test_features", "test_labels"):
        path = os.path.join(directory, FEATURE_FILES[name])
        try:
            loaded.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # any unreadable file is the user's to fix; say which
            raise UserError(
                f"cannot read {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from None
    train_features, train_labels, test_features, test_labels = loaded
    if train_features.shape[0] != train_labels.shape[0] or test_features.shape[0] != test_labels.shape[0]:
        raise UserError(f"features and labels in {directory} have different lengths")
    return train_features.float(), train_labels.long(), test_features.float(), test_labels.long()


def load_features_meta(directory: str | os.PathLike) -> dict:
    """The `meta` saved by `dump_features`, or {} for dumps without one (e.g. DINO v1's)."""
    path = os.path.join(directory, FEATURE_META_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# -------------------------------------------------------------------------------- shared eval set-up


def load_eval_backbone(model_cfg: DictConfig, device_ctx: DeviceContext) -> nn.Module:
    """The frozen backbone an eval config names (`model.pretrained_weights`, arch, patch size, …), on the device.

    Loading goes through `dino.hub.resolve_backbone`: strict, arch inferred from the file, and a UserError
    listing missing/unexpected keys when the file does not fit.
    """
    model = resolve_backbone(
        model_cfg.pretrained_weights or None,
        arch=model_cfg.get("arch") or None,
        patch_size=model_cfg.get("patch_size") or None,
        checkpoint_key=model_cfg.get("checkpoint_key") or "teacher",
        num_register_tokens=model_cfg.get("num_register_tokens"),
        allow_pickle=bool(model_cfg.get("allow_pickle", False)),
    )
    model.requires_grad_(False)
    return model.eval().to(device_ctx.device)


def resolve_data_path(data_path: str | None) -> str:
    """`--data_path`, or the generated demo dataset when it is empty (so the scripts work out of the box)."""
    if data_path:
        return require_path(data_path, "--data_path", must_be_dir=True)
    path = demo_dataset.ensure_demo_dataset()
    logger.info(f"no --data_path given: evaluating on the demo dataset at {path}")
    return path


@dataclass
class EvalImageSizes:
    """Resize (shorter side) and centre-crop size of the evaluation transform."""

    resize_size: int
    crop_size: int


def resolve_image_sizes(
    resize_size: int | None, crop_size: int | None, native_size: int | None = None
) -> EvalImageSizes:
    """Fill unset sizes: the papers' 256 → 224, or for images of a known size (the demo dataset) crop =
    that size and resize = crop·256/224, keeping the protocol's crop ratio without upsampling small images."""
    if crop_size is None:
        crop_size = native_size if native_size else 224
    if resize_size is None:
        resize_size = round(crop_size * 256 / 224)
    if crop_size > resize_size:
        raise UserError(f"--crop_size {crop_size} is larger than --resize_size {resize_size}")
    return EvalImageSizes(int(resize_size), int(crop_size))


def demo_image_size(data_path: str) -> int | None:
    """Image size recorded by the demo-dataset generator in `data_path`, or None for any other folder."""
    marker = os.path.join(data_path, "complete.json")
    try:
        with open(marker, encoding="utf-8") as handle:
            return int(json.load(handle)["params"]["image_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_train_val_datasets(
    data_path: str, train_transform, val_transform
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The ImageFolder pair `<data_path>/train` and `<data_path>/val` with identical class sets.

    Raises a UserError before any loader worker starts when a split is missing or the class folders differ
    (naming the classes only one split has); empty class folders produce a warning from the dataset.
    """
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data_path, split)):
            raise UserError(
                f"{data_path} has no '{split}' folder; the evaluation expects the ImageFolder layout "
                f"<data_path>/train/<class>/<image> and <data_path>/val/<class>/<image>"
            )
    train = ImageFolderDataset(os.path.join(data_path, "train"), train_transform)
    val = ImageFolderDataset(os.path.join(data_path, "val"), val_transform)
    check_same_classes(train.classes, val.classes)
    return train, val


def check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str]) -> None:
    """UserError naming the classes that only one split has (labels are indices of sorted class names,
    so a differing set would silently compare different classes)."""
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    if only_train or only_val:
        parts = []
        if only_train:
            parts.append(
                f"only in train: {only_train[:10]}"
                + (f" (+{len(only_train) - 10} more)" if len(only_train) > 10 else "")
            )
        if only_val:
            parts.append(
                f"only in val: {only_val[:10]}" + (f" (+{len(only_val) - 10} more)" if len(only_val) > 10 else "")
            )
        raise UserError("train and val have different class folders; " + "; ".join(parts))


@dataclass
class SplitFeatures:
    """Features and labels of the train and val splits, with what produced them."""

    train_features: Tensor
    train_labels: Tensor
    val_features: Tensor
    val_labels: Tensor
    classes: list[str] | None
    protocol: dict

    @property
    def num_classes(self) -> int:
        """From the class folders when known (an empty class still counts), else from the labels."""
        if self.classes:
            return len(self.classes)
        return int(max(int(self.train_labels.max()), int(self.val_labels.max()))) + 1


def features_from_config(
    cfg: DictConfig,
    device_ctx: DeviceContext,
    feature_fn: FeatureFn | None = None,
    feature_name: str = "L2-normalised final [CLS] token",
) -> SplitFeatures:
    """Train/val features an eval config asks for: read from `cfg.load_features`, or extracted with the
    backbone of `cfg.model` from `<cfg.data.data_path>/{train,val}` (resize + centre crop), then saved to
    `cfg.dump_features` when set.  Every rank returns the full features."""
    protocol: dict = dict(features=feature_name, checkpoint=cfg.model.pretrained_weights or "official release")
    if cfg.load_features:
        train_features, train_labels, val_features, val_labels = load_features(cfg.load_features)
        meta = load_features_meta(cfg.load_features)
        protocol.update(loaded_features=str(cfg.load_features), checkpoint=meta.get("checkpoint", "unknown"))
        return SplitFeatures(train_features, train_labels, val_features, val_labels, meta.get("classes"), protocol)

    data_path = resolve_data_path(cfg.data.data_path)
    sizes = resolve_image_sizes(cfg.data.resize_size, cfg.data.crop_size, demo_image_size(data_path))
    transform = make_eval_transform(sizes.resize_size, sizes.crop_size)
    train_set, val_set = build_train_val_datasets(data_path, transform, transform)
    model = load_eval_backbone(cfg.model, device_ctx)
    protocol.update(data_path=data_path, resize_size=sizes.resize_size, crop_size=sizes.crop_size)
    if is_main_process():
        logger.info(
            f"features: {feature_name} of {protocol['checkpoint']}; images: {data_path}/{{train,val}}, "
            f"resize {sizes.resize_size} + centre crop {sizes.crop_size}; {len(train_set)} train / {len(val_set)} val, "
            f"{len(train_set.classes)} classes"
        )
    batch_size, workers = int(cfg.data.batch_size_per_device), int(cfg.data.num_workers)
    train_features, train_labels, train_skipped = extract_readable_features(
        model, train_set, device_ctx, batch_size, workers, feature_fn, "train features"
    )
    val_features, val_labels, val_skipped = extract_readable_features(
        model, val_set, device_ctx, batch_size, workers, feature_fn, "val features"
    )
    # an unreadable image is left out, not replaced by a neighbour (possibly of another class): say how many
    protocol.update(skipped_train=len(train_skipped), skipped_val=len(val_skipped))
    for name, dataset, skipped in (("train", train_set, train_skipped), ("val", val_set, val_skipped)):
        if skipped and is_main_process():
            shown = ", ".join(dataset.samples[i][0] for i in skipped[:5]) + (" …" if len(skipped) > 5 else "")
            logger.warning(f"warning: skipped {len(skipped)} unreadable {name} image(s), not counted: {shown}")
    classes = list(train_set.classes)
    if cfg.dump_features and is_main_process():
        meta = dict(classes=classes, data_path=data_path, checkpoint=protocol["checkpoint"], features=feature_name)
        dump_features(cfg.dump_features, train_features, train_labels, val_features, val_labels, meta)
        logger.info(f"features saved to {cfg.dump_features}")
    return SplitFeatures(train_features, train_labels, val_features, val_labels, classes, protocol)
