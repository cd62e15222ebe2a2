"""DAVIS-2017 semi-supervised video object segmentation: dataset layout, palette PNGs and the official metrics.

Dataset (Pont-Tuset et al., "The 2017 DAVIS Challenge on Video Object Segmentation"), as distributed:

    <data_path>/JPEGImages/480p/<sequence>/00000.jpg …
    <data_path>/Annotations/480p/<sequence>/00000.png …   palette PNGs: 0 background, 1..N objects, 255 void
    <data_path>/ImageSets/2017/val.txt                     one sequence name per line

Metrics, with the semantics of the official davis2017-evaluation code (semi-supervised task):

- region similarity J = |(S ∩ G) \\ void| / |(S ∪ G) \\ void|, 1 when the union is empty (`db_eval_iou`);
- contour accuracy F = 2PR / (P + R) between the boundary maps of S and G (`db_eval_boundary`): a boundary
  pixel matches when the other boundary lies within a disk of radius ceil(0.008 · image diagonal) pixels
  (or `bound_th` pixels when bound_th ≥ 1); F = 1 when both masks are empty, 0 when only one is;
- per object: mean, recall = nanmean(v > 0.5) (nan counts as a failure) and decay = mean of the first
  quarter-bin − mean of the last one (`db_statistics`);
- the first frame (given) and the last frame are not scored; void pixels are set to background in the
  ground truth and not excluded (the official semi-supervised evaluation passes no void mask); the number of
  objects comes from the first ground-truth frame and objects missing from a prediction count as empty;
- J-Mean, J-Recall, J-Decay, F-… are means over all objects of all sequences; J&F-Mean = (J-Mean + F-Mean) / 2.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from dino.errors import UserError, require_path

RESOLUTION = "480p"
VOID_LABEL = 255
BOUNDARY_TOLERANCE = 0.008
GLOBAL_MEASURES = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


# ------------------------------------------------------------------------------------------ layout


@dataclass
class DavisSequence:
    """One sequence: its frames (JPEG paths) and ground-truth annotations (PNG paths), both sorted by name."""

    name: str
    frame_paths: list[str]
    annotation_paths: list[str]


def split_file(data_path: str, split: str = "val", year: str = "2017") -> str:
    return os.path.join(data_path, "ImageSets", year, f"{split}.txt")


def read_sequence_names(data_path: str, split: str = "val", year: str = "2017") -> list[str]:
    """Sequence names listed in `ImageSets/<year>/<split>.txt` (blank lines ignored)."""
    path = split_file(data_path, split, year)
    if not os.path.isfile(path):
        raise UserError(
            f"DAVIS split file {path} does not exist (expected the DAVIS-2017 layout: "
            f"JPEGImages/{RESOLUTION}/<seq>/*.jpg, Annotations/{RESOLUTION}/<seq>/*.png, ImageSets/{year}/{split}.txt)"
        )
    with open(path, encoding="utf-8") as handle:
        names = [line.strip() for line in handle if line.strip()]
    if not names:
        raise UserError(f"DAVIS split file {path} lists no sequences")
    return names


def _sorted_files(folder: str, extension: str) -> list[str]:
    from dino.data.datasets import list_images

    return list(list_images(folder, recursive=False, extensions=(extension,)))


def load_davis(data_path: str, split: str = "val", year: str = "2017", need_frames: bool = True) -> list[DavisSequence]:
    """The sequences of a DAVIS split, validated: every listed sequence must have its annotation folder with
    a first-frame annotation, and (with need_frames) a JPEG folder; UserErrors name the missing path."""
    data_path = require_path(data_path, "--data_path", must_be_dir=True)
    sequences = []
    for name in read_sequence_names(data_path, split, year):
        annotation_dir = os.path.join(data_path, "Annotations", RESOLUTION, name)
        if not os.path.isdir(annotation_dir):
            raise UserError(
                f"annotation folder {annotation_dir} does not exist (sequence {name!r} is listed in {split_file(data_path, split, year)})"
            )
        annotations = _sorted_files(annotation_dir, ".png")
        if not annotations:
            raise UserError(f"annotation folder {annotation_dir} holds no .png annotations")
        frames: list[str] = []
        if need_frames:
            frame_dir = os.path.join(data_path, "JPEGImages", RESOLUTION, name)
            if not os.path.isdir(frame_dir):
                raise UserError(
                    f"frame folder {frame_dir} does not exist (sequence {name!r} is listed in {split_file(data_path, split, year)})"
                )
            frames = _sorted_files(frame_dir, ".jpg")
            if not frames:
                raise UserError(f"frame folder {frame_dir} holds no .jpg frames")
            first_annotation = os.path.join(annotation_dir, os.path.splitext(os.path.basename(frames[0]))[0] + ".png")
            if not os.path.isfile(first_annotation):
                raise UserError(f"first-frame annotation {first_annotation} does not exist")
        sequences.append(DavisSequence(name, frames, annotations))
    return sequences


# ------------------------------------------------------------------------------------------ palette PNGs


def default_palette() -> list[int]:
    """The 256-colour palette of the DAVIS / PASCAL VOC annotations (bits of the index spread over R, G, B)."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        code = index
        for bit in range(8):
            red |= ((code >> 0) & 1) << (7 - bit)
            green |= ((code >> 1) & 1) << (7 - bit)
            blue |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette.extend((red, green, blue))
    return palette


def read_label_png(path: str) -> tuple[np.ndarray, list[int] | None]:
    """(labels (H, W) uint8, palette or None) of an indexed PNG; the indices are read as they are stored."""
    try:
        with Image.open(path) as image:
            palette = image.getpalette() if image.mode == "P" else None
            if image.mode not in ("P", "L"):
                raise UserError(f"{path} is a {image.mode} image; DAVIS annotations are indexed (palette) PNGs")
            return np.array(image, dtype=np.uint8), palette
    except OSError as err:
        raise UserError(f"cannot read annotation {path}: {err}") from None


def write_label_png(path: str, labels: np.ndarray, palette: list[int] | None = None) -> None:
    """Save labels (H, W) as an indexed PNG with the DAVIS palette (or the one given)."""
    if labels.ndim != 2:
        raise ValueError(f"label maps must be 2-D, got shape {labels.shape}")
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette = list(palette or default_palette())
    image.putpalette(palette + [0] * (768 - len(palette)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, format="PNG")


# ------------------------------------------------------------------------------------------ metrics


def db_eval_iou(
    annotation: np.ndarray, segmentation: np.ndarray, void_pixels: np.ndarray | None = None
) -> np.ndarray | float:
    """Region similarity J (DAVIS 2017 benchmark) of binary masks (…, H, W), per leading index.

    J = |(S ∩ G) \\ void| / |(S ∪ G) \\ void|,   J = 1 when the union (outside void) is empty.
    """
    annotation = np.asarray(annotation).astype(bool)
    segmentation = np.asarray(segmentation).astype(bool)
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape} differ in shape")
    keep = np.ones_like(annotation) if void_pixels is None else ~np.asarray(void_pixels).astype(bool)
    intersection = np.sum(annotation & segmentation & keep, axis=(-2, -1))
    union = np.sum((annotation | segmentation) & keep, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        j = intersection / union
    j = np.where(union == 0, 1.0, j)
    return float(j) if j.ndim == 0 else j


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary map of a binary mask, with the DAVIS `_seg2bmap` semantics.

    A pixel is a boundary pixel when it differs from its east, south or south-east neighbour (outside the
    image counts as background); on the last row only the east neighbour and on the last column only the
    south neighbour are compared, and the bottom-right pixel is never a boundary.
    """
    seg = np.asarray(mask).astype(bool)
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    boundary = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    boundary[-1, :] = seg[-1, :] ^ east[-1, :]
    boundary[:, -1] = seg[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def disk(radius: int) -> np.ndarray:
    """Disk structuring element of the given radius: (2r+1)² grid, True where x² + y² ≤ r²
    (scikit-image's `morphology.disk`)."""
    offsets = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(offsets, offsets)
    return x**2 + y**2 <= radius**2


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of `mask` by `disk(radius)`; outside the image counts as empty (what OpenCV's
    `dilate` with its default border does)."""
    return ndimage.binary_dilation(np.asarray(mask, bool), structure=disk(radius), border_value=0)


def boundary_matches(boundary: np.ndarray, other: np.ndarray, radius: int) -> np.ndarray:
    """Pixels of `boundary` that lie inside `other` dilated by `disk(radius)`: boundary & dilate_disk(other).

    Computed as "some pixel of `other` within Euclidean distance `radius`" with a k-d tree over the boundary
    pixels — the same set (the disk is {x² + y² ≤ r²}), but far faster than a dense dilation of a full
    frame with a 17×17 disk (480p: r = 8).  Returns a boolean mask of `boundary`'s shape.
    """
    from scipy.spatial import cKDTree

    matched = np.zeros(np.shape(boundary), dtype=bool)
    points, other_points = np.argwhere(boundary), np.argwhere(other)
    if len(points) == 0 or len(other_points) == 0:
        return matched
    # squared distances are integers, so nothing lies in (r, r + 1e-6]: the bound only guards float rounding
    distances, _ = cKDTree(other_points).query(points, k=1, distance_upper_bound=radius + 1e-6)
    hits = points[distances <= radius]
    matched[hits[:, 0], hits[:, 1]] = True
    return matched


def boundary_tolerance(shape: tuple[int, int], bound_th: float = BOUNDARY_TOLERANCE) -> int:
    """Match radius in pixels: bound_th itself when ≥ 1, else ceil(bound_th · image diagonal)."""
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * math.hypot(*shape)))


def f_measure(
    segmentation: np.ndarray,
    annotation: np.ndarray,
    void_pixels: np.ndarray | None = None,
    bound_th: float = BOUNDARY_TOLERANCE,
) -> float:
    """Boundary F-measure of one frame (DAVIS 2017 benchmark `f_measure`).

    P = fraction of the segmentation's boundary pixels within the tolerance disk of the annotation's
    boundary, R = the converse; F = 2PR / (P + R) (0 when P + R = 0).  Both boundaries empty → P = R = 1;
    only the segmentation's empty → P = 1, R = 0; only the annotation's empty → P = 0, R = 1 (so F = 0).
    """
    keep = np.ones(segmentation.shape, bool) if void_pixels is None else ~np.asarray(void_pixels).astype(bool)
    radius = boundary_tolerance(segmentation.shape, bound_th)
    seg_boundary = seg2bmap(np.asarray(segmentation).astype(bool) & keep)
    gt_boundary = seg2bmap(np.asarray(annotation).astype(bool) & keep)
    n_seg, n_gt = int(seg_boundary.sum()), int(gt_boundary.sum())
    if n_seg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_seg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_seg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = boundary_matches(seg_boundary, gt_boundary, radius).sum() / n_seg
        recall = boundary_matches(gt_boundary, seg_boundary, radius).sum() / n_gt
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def db_eval_boundary(
    annotation: np.ndarray,
    segmentation: np.ndarray,
    void_pixels: np.ndarray | None = None,
    bound_th: float = BOUNDARY_TOLERANCE,
) -> np.ndarray | float:
    """Contour accuracy F of one frame (H, W) → float, or of a stack (T, H, W) → (T,) array."""
    annotation, segmentation = np.asarray(annotation), np.asarray(segmentation)
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape} differ in shape")
    if annotation.ndim == 2:
        return f_measure(segmentation, annotation, void_pixels, bound_th)
    return np.array(
        [
            f_measure(segmentation[t], annotation[t], None if void_pixels is None else void_pixels[t], bound_th)
            for t in range(annotation.shape[0])
        ]
    )


def db_statistics(per_frame_values: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame J or F (DAVIS 2017 benchmark `db_statistics`).

        mean   = nanmean(v)
        recall = nanmean(v > 0.5)            (a nan frame counts as a failure)
        decay  = nanmean(bin_1) − nanmean(bin_4), with the bins [ids_i, ids_{i+1}] (inclusive) where
                 ids = round(linspace(1, T, 5) + 1e-10) − 1; neighbouring bins share their border frame.
    The official code stores ids as uint8, which would wrap for sequences of 256+ frames; we do not.
    """
    values = np.asarray(per_frame_values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = float(np.nanmean(values)) if values.size else float("nan")
        recall = float(np.nanmean(values > 0.5)) if values.size else float("nan")
        ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.int64)
        bins = [values[ids[i] : ids[i + 1] + 1] for i in range(4)]
        first = np.nanmean(bins[0]) if bins[0].size else float("nan")
        last = np.nanmean(bins[3]) if bins[3].size else float("nan")
    return mean, recall, float(first - last)


# ------------------------------------------------------------------------------------------ evaluation


def object_masks(labels: np.ndarray, num_objects: int) -> np.ndarray:
    """(num_objects, …) boolean masks, mask k-1 = (labels == k)."""
    ids = np.arange(1, num_objects + 1).reshape((-1,) + (1,) * labels.ndim)
    return labels[None] == ids


def evaluate_sequence(
    gt_labels: np.ndarray, predicted_labels: np.ndarray, sequence: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Per-object, per-frame J and F of one sequence, (num_objects, T-2) each.

    gt_labels, predicted_labels: (T, H, W) label maps of all annotated frames (void = 255 in the ground
    truth).  Void becomes background, the first and last frames are dropped, the object count is the
    largest id in the first ground-truth frame; a predicted id above it is an error (as in the official
    evaluation) and objects the prediction lacks are empty masks.
    """
    gt_labels = np.where(gt_labels == VOID_LABEL, 0, gt_labels)
    if gt_labels.shape != predicted_labels.shape:
        raise UserError(
            f"sequence {sequence}: predictions have shape {predicted_labels.shape[1:]} x {predicted_labels.shape[0]} frames, "
            f"ground truth {gt_labels.shape[1:]} x {gt_labels.shape[0]} frames"
        )
    num_objects = int(gt_labels[0].max())
    gt_scored, predicted_scored = gt_labels[1:-1], predicted_labels[1:-1]
    highest_prediction = int(predicted_scored.max()) if predicted_scored.size else 0
    if highest_prediction > num_objects:
        raise UserError(
            f"sequence {sequence}: a prediction holds object id {highest_prediction} but the first "
            f"ground-truth frame has only {num_objects} objects"
        )
    gt_objects = object_masks(gt_scored, num_objects)
    predicted_objects = object_masks(predicted_scored, num_objects)
    j = np.zeros((num_objects, gt_scored.shape[0]))
    f = np.zeros_like(j)
    for k in range(num_objects):
        j[k] = db_eval_iou(gt_objects[k], predicted_objects[k])
        f[k] = db_eval_boundary(gt_objects[k], predicted_objects[k])
    return j, f


def read_sequence_labels(paths: list[str]) -> np.ndarray:
    frames = [read_label_png(p)[0] for p in paths]
    shapes = {frame.shape for frame in frames}
    if len(shapes) > 1:
        raise UserError(f"annotations of {os.path.dirname(paths[0])} differ in size: {sorted(shapes)}")
    return np.stack(frames)


def evaluate_davis(
    data_path: str, results_path: str, split: str = "val", year: str = "2017", progress: bool = True
) -> dict:
    """Score the palette PNGs under `results_path/<sequence>/<frame>.png` against the DAVIS ground truth.

    Returns {'global': {J&F-Mean, J-Mean, J-Recall, J-Decay, F-Mean, F-Recall, F-Decay},
             'per_object': {'<seq>_<k>': {'J-Mean', 'F-Mean', 'J&F-Mean'}}, 'num_objects', 'num_sequences'}
    with values as fractions (as the official code prints them).
    """
    from tqdm import tqdm

    sequences = load_davis(data_path, split, year, need_frames=False)
    results_path = require_path(results_path, "results folder", must_be_dir=True)
    stats: dict[str, list[float]] = {key: [] for key in ("JM", "JR", "JD", "FM", "FR", "FD")}
    per_object: dict[str, dict[str, float]] = {}
    for sequence in tqdm(sequences, desc="DAVIS evaluation", disable=not progress, dynamic_ncols=True):
        gt_labels = read_sequence_labels(sequence.annotation_paths)
        frame_names = [os.path.basename(p) for p in sequence.annotation_paths]
        prediction_paths = [os.path.join(results_path, sequence.name, name) for name in frame_names]
        predicted = np.zeros_like(gt_labels)
        # the first and last frames are not scored, so their predictions need not exist
        for t in range(1, len(frame_names) - 1):
            if not os.path.isfile(prediction_paths[t]):
                raise UserError(
                    f"prediction {prediction_paths[t]} does not exist (expected one palette PNG per "
                    f"annotated frame under <results>/<sequence>/)"
                )
            predicted[t] = _read_prediction(prediction_paths[t], gt_labels.shape[1:])
        j, f = evaluate_sequence(gt_labels, predicted, sequence.name)
        for k in range(j.shape[0]):
            jm, jr, jd = db_statistics(j[k])
            fm, fr, fd = db_statistics(f[k])
            for key, value in zip(("JM", "JR", "JD", "FM", "FR", "FD"), (jm, jr, jd, fm, fr, fd)):
                stats[key].append(value)
            per_object[f"{sequence.name}_{k + 1}"] = {"J-Mean": jm, "F-Mean": fm, "J&F-Mean": (jm + fm) / 2}
    if not stats["JM"]:
        raise UserError(
            f"no objects to evaluate: the first annotation of every sequence in {split_file(data_path, split, year)} is empty"
        )
    means = {key: float(np.mean(values)) for key, values in stats.items()}
    global_results = {
        "J&F-Mean": (means["JM"] + means["FM"]) / 2,
        "J-Mean": means["JM"],
        "J-Recall": means["JR"],
        "J-Decay": means["JD"],
        "F-Mean": means["FM"],
        "F-Recall": means["FR"],
        "F-Decay": means["FD"],
    }
    return {
        "global": global_results,
        "per_object": per_object,
        "num_objects": len(per_object),
        "num_sequences": len(sequences),
    }


def _read_prediction(path: str, shape: tuple[int, ...]) -> np.ndarray:
    labels, _ = read_label_png(path)
    if labels.shape != tuple(shape):
        raise UserError(
            f"prediction {path} is {labels.shape[1]}x{labels.shape[0]}, the ground truth {shape[1]}x{shape[0]}"
        )
    return labels


def write_davis_csv(results: dict, output_dir: str, split: str = "val") -> tuple[str, str]:
    """The official evaluation's two CSV files: global_results-<split>.csv and per-sequence_results-<split>.csv."""
    os.makedirs(output_dir, exist_ok=True)
    global_path = os.path.join(output_dir, f"global_results-{split}.csv")
    with open(global_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(GLOBAL_MEASURES)
        writer.writerow([f"{results['global'][m]:.6f}" for m in GLOBAL_MEASURES])
    per_sequence_path = os.path.join(output_dir, f"per-sequence_results-{split}.csv")
    with open(per_sequence_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Sequence", "J-Mean", "F-Mean"])
        for name, values in results["per_object"].items():
            writer.writerow([name, f"{values['J-Mean']:.6f}", f"{values['F-Mean']:.6f}"])
    return global_path, per_sequence_path
