"""Metrics of the dense probes: semantic segmentation (as mmsegmentation computes them) and monocular depth
(as the standard depth evaluation code — BTS / AdaBins / the Monocular-Depth-Estimation-Toolbox — computes them).

Segmentation (mmseg `intersect_and_union` + `total_area_to_metrics`):

* the ground truth is remapped first (`label_map`, e.g. Cityscapes labelIds → trainIds); with
  `reduce_zero_label` (ADE20K) label 0 ("other") becomes 255 and every other label moves down by one;
* pixels whose label is `ignore_index` (255) are dropped; a predicted or true class outside [0, C) counts for nothing;
* four per-class areas are **summed over the whole dataset** (not averaged per image): intersection,
  union, prediction, label;
* IoU_c = I_c / U_c, Acc_c = I_c / label_c, aAcc = ΣI / Σlabel; mIoU and mAcc are `nanmean`s, so a class
  absent from both ground truth and prediction (0/0) is left out, while a class that is predicted but never
  present has IoU 0 (counted) and Acc NaN (left out).

Depth (per image, then the mean over images, as the toolbox's `pre_eval` + `pre_eval_to_metrics`):

* valid pixels: min_depth < gt < max_depth (strict), inside the evaluation crop (`eval_crop_mask`);
* the prediction is clamped to [min_depth, max_depth] first (BTS's evaluation; a no-op for our heads);
* δ_n = mean(max(gt/pred, pred/gt) < 1.25ⁿ), abs_rel = mean(|gt−pred|/gt), sq_rel = mean((gt−pred)²/gt),
  rmse = √mean((gt−pred)²), rmse_log = √mean((ln gt − ln pred)²), log10 = mean(|log10 gt − log10 pred|),
  silog = 100·√(mean(e²) − mean(e)²) with e = ln pred − ln gt;
* an image without a valid pixel gives NaN for every metric and is left out of the means.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = 255

# ---------------------------------------------------------------------------------------- segmentation


def remap_labels(
    label: Tensor,
    label_map: Mapping[int, int] | None = None,
    reduce_zero_label: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """mmseg's ground-truth preparation: `label_map` (old → new, all at once), then ADE20K's zero-label
    reduction (0 → ignore, c → c − 1, and the ignore value stays the ignore value)."""
    label = label.long().clone()
    if label_map:
        source = label.clone()
        for old, new in label_map.items():
            label[source == int(old)] = int(new)
    if reduce_zero_label:
        label[label == 0] = ignore_index
        label = label - 1
        label[label == ignore_index - 1] = ignore_index
    return label


def intersect_and_union(
    pred: Tensor,
    label: Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    label_map: Mapping[int, int] | None = None,
    reduce_zero_label: bool = False,
) -> Tensor:
    """Per-class (intersection, union, prediction, label) areas of one image: a (4, C) float64 tensor.

    `pred` holds class indices, `label` the ground truth as stored on disk (remapped here)."""
    label = remap_labels(torch.as_tensor(label), label_map, reduce_zero_label, ignore_index)
    pred = torch.as_tensor(pred).long()
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]

    def area(values: Tensor) -> Tensor:
        values = values[(values >= 0) & (values < num_classes)]
        return torch.bincount(values, minlength=num_classes)[:num_classes].double()

    area_intersect = area(pred[pred == label])
    area_pred = area(pred)
    area_label = area(label)
    return torch.stack([area_intersect, area_pred + area_label - area_intersect, area_pred, area_label])


def segmentation_metrics(areas: Tensor, class_names: list[str] | None = None) -> dict:
    """aAcc, mIoU, mAcc (percent) and per-class IoU / Acc from areas summed over a dataset ((4, C))."""
    areas = torch.as_tensor(areas, dtype=torch.float64).cpu()
    intersect, union, _, label = areas
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = (intersect / union).numpy()
        acc = (intersect / label).numpy()
        all_acc = float(intersect.sum() / label.sum()) if float(label.sum()) > 0 else float("nan")
    names = class_names or [str(i) for i in range(len(iou))]

    def mean(values: np.ndarray) -> float:
        return float(np.nanmean(values) * 100) if np.isfinite(values).any() else float("nan")

    return dict(
        aAcc=all_acc * 100,
        mIoU=mean(iou),
        mAcc=mean(acc),
        per_class={name: dict(IoU=float(i * 100), Acc=float(a * 100)) for name, i, a in zip(names, iou, acc)},
    )


# ---------------------------------------------------------------------------------------------- depth

DEPTH_METRICS = ("a1", "a2", "a3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")


def eval_crop_mask(height: int, width: int, crop: str | None) -> np.ndarray:
    """The evaluation region of a ground-truth map (True inside).

    none: everything.  nyu: the NYU valid region of the standard evaluation, rows 45:471 and columns 41:601
    of the 480×640 maps (scaled proportionally for maps of another size).  eigen: the KITTI crop of Eigen
    et al. (NIPS 2014), rows 0.3324324·H : 0.91351351·H, columns 0.0359477·W : 0.96405229·W.  garg: the KITTI
    crop of Garg et al. (ECCV 2016), rows 0.40810811·H : 0.99189189·H, columns 0.03594771·W : 0.96405229·W
    (the one the Monocular-Depth-Estimation-Toolbox uses for KITTI, with which DINOv2 evaluated).
    """
    mask = np.zeros((height, width), dtype=bool)
    if crop in (None, "", "none"):
        mask[:] = True
    elif crop == "nyu":
        if (height, width) == (480, 640):
            mask[45:471, 41:601] = True
        else:
            mask[
                round(45 / 480 * height) : round(471 / 480 * height), round(41 / 640 * width) : round(601 / 640 * width)
            ] = True
    elif crop == "eigen":
        mask[int(0.3324324 * height) : int(0.91351351 * height), int(0.0359477 * width) : int(0.96405229 * width)] = (
            True
        )
    elif crop == "garg":
        mask[int(0.40810811 * height) : int(0.99189189 * height), int(0.03594771 * width) : int(0.96405229 * width)] = (
            True
        )
    else:
        raise ValueError(f"unknown evaluation crop {crop!r} (none, nyu, eigen, garg)")
    return mask


def depth_errors(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """The standard metrics over matching 1-D arrays of valid ground truth and prediction (metres)."""
    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if gt.size == 0:
        return {name: float("nan") for name in DEPTH_METRICS}
    ratio = np.maximum(gt / pred, pred / gt)
    log_error = np.log(pred) - np.log(gt)
    return dict(
        a1=float((ratio < 1.25).mean()),
        a2=float((ratio < 1.25**2).mean()),
        a3=float((ratio < 1.25**3).mean()),
        abs_rel=float(np.mean(np.abs(gt - pred) / gt)),
        sq_rel=float(np.mean((gt - pred) ** 2 / gt)),
        rmse=float(np.sqrt(np.mean((gt - pred) ** 2))),
        rmse_log=float(np.sqrt(np.mean(log_error**2))),
        log10=float(np.mean(np.abs(np.log10(gt) - np.log10(pred)))),
        silog=float(np.sqrt(max(np.mean(log_error**2) - np.mean(log_error) ** 2, 0.0)) * 100),
    )


def image_depth_metrics(
    pred: np.ndarray | Tensor, gt: np.ndarray | Tensor, min_depth: float, max_depth: float, crop: str | None = None
) -> dict[str, float]:
    """One image: valid mask (depth caps and crop), prediction clamped to the caps, `depth_errors`."""
    pred = np.asarray(
        torch.as_tensor(pred).detach().cpu().double().numpy() if isinstance(pred, Tensor) else pred, dtype=np.float64
    ).squeeze()
    gt = np.asarray(
        torch.as_tensor(gt).detach().cpu().double().numpy() if isinstance(gt, Tensor) else gt, dtype=np.float64
    ).squeeze()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    pred = np.nan_to_num(pred, nan=min_depth, posinf=max_depth, neginf=min_depth).clip(min_depth, max_depth)
    valid = (gt > min_depth) & (gt < max_depth) & eval_crop_mask(*gt.shape, crop)
    return depth_errors(gt[valid], pred[valid])


class DepthMetricAccumulator:
    """Sums per-image metrics (and how many images had valid pixels) for the mean over images; `totals()`
    is one tensor, so ranks can `all_reduce_sum` it."""

    def __init__(self):
        self.sums = torch.zeros(len(DEPTH_METRICS) + 1, dtype=torch.float64)

    def add(self, metrics: Mapping[str, float]) -> None:
        values = torch.tensor([metrics[name] for name in DEPTH_METRICS], dtype=torch.float64)
        if torch.isfinite(values).all():
            self.sums[:-1] += values
            self.sums[-1] += 1

    def totals(self) -> Tensor:
        return self.sums

    @staticmethod
    def summary(totals: Tensor) -> dict[str, float]:
        totals = torch.as_tensor(totals, dtype=torch.float64).cpu()
        count = float(totals[-1])
        result = {name: (float(totals[i]) / count if count else float("nan")) for i, name in enumerate(DEPTH_METRICS)}
        result["num_images"] = int(count)
        return result
