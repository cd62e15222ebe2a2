"""Did the model learn anything worth having?  Weighted kNN of the teacher next to raw pixels and random init.

Two baselines are measured on the same images, with the same eval transform and the same kNN protocol
(cosine similarity, weights exp(cos/T), top-k vote):

- **raw pixels**: the normalised eval image itself, flattened — what a user gets with no model at all;
- **random init**: a backbone of the same architecture, freshly initialised with the training seed.

Self-supervised features are worth having when they beat both clearly.  `report_knn_if_requested` runs after
training (`train.knn_eval`); `KnnMonitor` does the same during training every `train.knn_every_epochs` epochs,
computing the two baselines once.  Images are evaluated at the training resolution: the whole image resized to
`crops.global_crops_size` (no 224/256 centre crop that would cut the borders of small images).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from dino.data.datasets import ImageFolderDataset
from dino.data.transforms import make_eval_transform
from dino.distributed import DeviceContext, is_main_process
from dino.eval.features import extract_features
from dino.eval.knn import knn_classify
from dino.log import get_logger
from dino.train.data_pipeline import resolve_data_path

logger = get_logger(__name__)


def find_val_split(train_path: str) -> str | None:
    """`<parent>/val` next to a `<parent>/train` folder, when both are labelled ImageFolders."""
    train_path = os.path.normpath(train_path)
    if os.path.basename(train_path) != "train":
        return None
    val = os.path.join(os.path.dirname(train_path), "val")
    return val if os.path.isdir(val) else None


def raw_pixel_features(
    dataset: torch.utils.data.Dataset, batch_size: int = 256, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, C·H·W), labels (N,)): the eval-transformed images themselves, flattened."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    features, labels = [], []
    for images, targets in loader:
        features.append(images.flatten(1).float())
        labels.append(torch.as_tensor(targets))
    return torch.cat(features), torch.cat(labels)


@dataclass
class KnnProbe:
    """A labelled train/val pair at one resolution, and the kNN protocol to score features on it (k and the
    temperature: `train.knn_k` / `train.knn_temperature`, their defaults in the YAML only)."""

    train_set: ImageFolderDataset
    val_set: ImageFolderDataset
    k: int
    temperature: float
    batch_size: int
    num_workers: int

    @classmethod
    def from_folders(cls, train_path: str, val_path: str, image_size: int, **kwargs) -> "KnnProbe":
        transform = make_eval_transform(resize_size=image_size, crop_size=image_size)
        train_set = ImageFolderDataset(train_path, transform=transform)
        val_set = ImageFolderDataset(val_path, transform=transform, class_to_idx=train_set.class_to_idx)
        return cls(train_set, val_set, **kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.train_set.classes)

    def score(
        self, train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor, val_labels: torch.Tensor
    ) -> float:
        results = knn_classify(
            train_feats,
            train_labels,
            val_feats,
            val_labels,
            k_values=(self.k,),
            temperature=self.temperature,
            num_classes=self.num_classes,
        )
        return float(next(iter(results.values()))[0])

    def model_top1(self, model: torch.nn.Module, ctx: DeviceContext, name: str = "model") -> float:
        was_training = model.training
        model = model.to(ctx.device).eval()
        try:
            train = extract_features(
                model, self.train_set, ctx, self.batch_size, self.num_workers, desc=f"{name}: train features"
            )
            val = extract_features(
                model, self.val_set, ctx, self.batch_size, self.num_workers, desc=f"{name}: val features"
            )
        finally:
            model.train(was_training)
        return self.score(*train, *val)

    def raw_pixels_top1(self) -> float:
        train = raw_pixel_features(self.train_set, num_workers=self.num_workers)
        val = raw_pixel_features(self.val_set, num_workers=self.num_workers)
        return self.score(*train, *val)


def random_init_backbone(cfg: DictConfig) -> torch.nn.Module:
    """A backbone of the configured architecture, initialised with the training seed (never trained)."""
    from dino.train.meta_arch import build_student_backbone

    torch.manual_seed(int(cfg.train.seed))
    backbone, _ = build_student_backbone(cfg.model)
    return backbone


def baseline_verdict(
    trained: float, raw: float, random: float, margin_raw: float = 5.0, margin_random: float = 20.0
) -> str:
    """One line: does the trained model beat raw pixels by `margin_raw` and random init by `margin_random`?"""
    if trained >= raw + margin_raw and trained >= random + margin_random:
        return (
            f"features worth having: ≥ {margin_raw:g} points over raw pixels and ≥ {margin_random:g} over random init"
        )
    if trained > raw:
        short = []
        if trained < raw + margin_raw:
            short.append(f"{raw + margin_raw - trained:.1f} points short of +{margin_raw:g} over raw pixels")
        if trained < random + margin_random:
            short.append(f"{random + margin_random - trained:.1f} points short of +{margin_random:g} over random init")
        return f"better than raw pixels, but not by a clear margin ({'; '.join(short)}): train longer"
    return (
        "NOT better than raw pixels: on this data these features are worse than no model at all "
        "(train longer; BENCHMARKS.md 'Small real datasets' shows how far short runs get)"
    )


def format_baseline_table(k: int, temperature: float, where: str, rows: dict[str, float], num_classes: int) -> str:
    """The kNN report: one row per feature source, the margins of the first row over the others, chance level."""
    names = list(rows)
    lines = [f"kNN (k={k}, T={temperature}) top-1 on {where}:"]
    lines += [f"  {name:<16} {value:6.2f} %" for name, value in rows.items()]
    first = names[0]
    for other in names[1:]:
        lines.append(f"  vs {other:<13} {rows[first] - rows[other]:+6.2f} points")
    lines.append(f"  (chance: {100 / max(num_classes, 1):.1f} %)")
    return "\n".join(lines)


def compare_with_baselines(
    probe: KnnProbe, trained: torch.nn.Module, random_backbone: torch.nn.Module, ctx: DeviceContext
) -> dict[str, float]:
    """kNN top-1 of the trained model, raw pixels and random init on one probe."""
    return {
        "trained teacher": probe.model_top1(trained, ctx, "trained teacher"),
        "raw pixels": probe.raw_pixels_top1(),
        "random init": probe.model_top1(random_backbone, ctx, "random init"),
    }


def _probe_from_cfg(cfg: DictConfig) -> tuple[KnnProbe | None, str, str | None]:
    train_path = resolve_data_path(cfg)
    val_path = find_val_split(train_path)
    if val_path is None:
        return None, train_path, None
    probe = KnnProbe.from_folders(
        train_path,
        val_path,
        int(cfg.crops.global_crops_size),
        k=int(cfg.train.knn_k),
        temperature=float(cfg.train.knn_temperature),
        batch_size=max(64, int(cfg.train.batch_size_per_device)),
        num_workers=min(int(cfg.train.num_workers), 2),
    )
    return probe, train_path, val_path


def report_knn_if_requested(cfg: DictConfig, result) -> dict[str, Any] | None:
    """After training: kNN of the exported teacher next to raw pixels and random init; writes knn_check.json."""
    if not bool(cfg.train.knn_eval) or not is_main_process():
        return None
    from dino.hub import load_backbone
    from dino.train.checkpoint import TEACHER_BACKBONE_NAME

    probe, train_path, val_path = _probe_from_cfg(cfg)
    if probe is None:
        logger.info(f"kNN check skipped: no labelled 'val' folder next to {train_path}")
        return None
    ctx = DeviceContext.create(str(cfg.train.device))
    trained = load_backbone(str(result.output_dir / TEACHER_BACKBONE_NAME))
    rows = compare_with_baselines(probe, trained, random_init_backbone(cfg), ctx)
    trained_top1, raw, random = rows["trained teacher"], rows["raw pixels"], rows["random init"]
    report = {
        "k": probe.k,
        "temperature": probe.temperature,
        "image_size": int(cfg.crops.global_crops_size),
        "trained_top1": trained_top1,
        "raw_pixels_top1": raw,
        "random_init_top1": random,
        "improvement": trained_top1 - random,
        "improvement_over_raw_pixels": trained_top1 - raw,
        "val_path": val_path,
        "num_classes": probe.num_classes,
        "num_train": len(probe.train_set),
        "num_val": len(probe.val_set),
        "verdict": baseline_verdict(trained_top1, raw, random),
    }
    logger.info("\n" + format_baseline_table(probe.k, probe.temperature, val_path, rows, probe.num_classes))
    logger.info(f"  → {report['verdict']}")
    with open(result.output_dir / "knn_check.json", "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return report


class KnnMonitor:
    """Online evidence during training: teacher kNN every N epochs next to raw pixels and random init.

    The two baselines are computed once, at the first call.  Call `maybe_run(teacher_backbone, epoch)` at the end
    of every epoch (epoch counted from 1); it returns the row dict (and logs it with `log`) on the epochs it
    runs, None otherwise.  Does nothing when the data has no labelled val split or `every` is 0.
    """

    def __init__(
        self, cfg: DictConfig, every: int | None = None, log: Callable[[dict[str, float]], None] | None = None
    ):
        self.every = int(every if every is not None else cfg.train.knn_every_epochs)
        self.cfg = cfg
        self.log = log
        self.probe: KnnProbe | None = None
        self.baselines: dict[str, float] | None = None
        self.history: list[dict[str, float]] = []
        if self.every > 0 and is_main_process():
            self.probe, train_path, _ = _probe_from_cfg(cfg)
            if self.probe is None:
                logger.info(f"kNN monitor off: no labelled 'val' folder next to {train_path}")

    @property
    def active(self) -> bool:
        return self.probe is not None and self.every > 0

    def maybe_run(
        self, teacher_backbone: torch.nn.Module, epoch: int, ctx: DeviceContext | None = None, force: bool = False
    ) -> dict[str, float] | None:
        if not self.active or (not force and epoch % self.every):
            return None
        ctx = ctx or DeviceContext.create(str(self.cfg.train.device))
        if self.baselines is None:
            self.baselines = {
                "raw pixels": self.probe.raw_pixels_top1(),
                "random init": self.probe.model_top1(random_init_backbone(self.cfg), ctx, "random init"),
            }
        teacher = self.probe.model_top1(teacher_backbone, ctx, f"epoch {epoch} teacher")
        row = {
            "epoch": epoch,
            "knn_teacher": teacher,
            "knn_raw_pixels": self.baselines["raw pixels"],
            "knn_random_init": self.baselines["random init"],
        }
        self.history.append(row)
        logger.info(
            f"epoch {epoch}: kNN top-1 teacher {teacher:.2f} % | raw pixels {row['knn_raw_pixels']:.2f} % "
            f"| random init {row['knn_random_init']:.2f} % ({teacher - row['knn_raw_pixels']:+.2f} vs raw)"
        )
        if self.log is not None:
            self.log(row)
        return row
