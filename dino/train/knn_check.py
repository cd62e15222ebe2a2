"""After training: does the teacher beat a random backbone? Weighted kNN on the data's labelled val split."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from omegaconf import DictConfig

from dino.data.datasets import ImageFolderDataset
from dino.data.transforms import make_eval_transform
from dino.distributed import DeviceContext, is_main_process
from dino.eval.features import extract_features
from dino.eval.knn import knn_classify
from dino.hub import load_backbone
from dino.train.checkpoint import TEACHER_BACKBONE_NAME
from dino.train.data_pipeline import resolve_data_path
from dino.train.meta_arch import build_student_backbone


def find_val_split(train_path: str) -> str | None:
    """`<parent>/val` next to a `<parent>/train` folder, when both are labelled ImageFolders."""
    train_path = os.path.normpath(train_path)
    if os.path.basename(train_path) != "train":
        return None
    val = os.path.join(os.path.dirname(train_path), "val")
    return val if os.path.isdir(val) else None


def report_knn_if_requested(cfg: DictConfig, result) -> dict[str, Any] | None:
    if not bool(cfg.train.knn_eval) or not is_main_process():
        return None
    train_path = resolve_data_path(cfg)
    val_path = find_val_split(train_path)
    if val_path is None:
        print(f"kNN check skipped: no labelled 'val' folder next to {train_path}")
        return None
    ctx = DeviceContext.create(str(cfg.train.device))
    size = int(cfg.crops.global_crops_size)
    transform = make_eval_transform(resize_size=size * 256 // 224, crop_size=size)
    train_set = ImageFolderDataset(train_path, transform=transform)
    val_set = ImageFolderDataset(val_path, transform=transform, class_to_idx=train_set.class_to_idx)
    k, temperature = int(cfg.train.knn_k), float(cfg.train.knn_temperature)
    batch = int(cfg.train.batch_size_per_device)
    workers = min(int(cfg.train.num_workers), 2)

    def knn_top1(model: torch.nn.Module, name: str) -> float:
        model = model.to(ctx.device).eval()
        train_feats, train_labels = extract_features(model, train_set, ctx, batch, workers, desc=f"{name}: train features")
        val_feats, val_labels = extract_features(model, val_set, ctx, batch, workers, desc=f"{name}: val features")
        results = knn_classify(train_feats, train_labels, val_feats, val_labels, k_values=(k,), temperature=temperature)
        return float(next(iter(results.values()))[0])

    trained = load_backbone(str(result.output_dir / TEACHER_BACKBONE_NAME))
    torch.manual_seed(int(cfg.train.seed))
    random_backbone, _ = build_student_backbone(cfg.model)
    trained_top1 = knn_top1(trained, "trained teacher")
    random_top1 = knn_top1(random_backbone, "random init")
    report = {"k": k, "temperature": temperature, "trained_top1": trained_top1, "random_init_top1": random_top1,
              "improvement": trained_top1 - random_top1, "val_path": val_path, "num_classes": len(train_set.classes)}
    print(f"\nkNN (k={k}, T={temperature}) top-1 on {val_path}:\n"
          f"  trained teacher  {trained_top1:6.2f} %\n"
          f"  random init      {random_top1:6.2f} %\n"
          f"  improvement      {trained_top1 - random_top1:+6.2f} points   (chance: {100 / len(train_set.classes):.1f} %)")
    with open(result.output_dir / "knn_check.json", "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return report
