"""Datasets of the dense probes, read in their official on-disk layouts, and their augmentations.

Segmentation (each sample: normalised image (3, H, W) float, label (H, W) long with classes 0..C−1 and 255 =
ignore; the label is remapped on loading exactly as mmsegmentation remaps it before scoring):

* ADE20K — `ADEChallengeData2016/images/{training,validation}/*.jpg` and
  `annotations/{training,validation}/*.png` (0 = "other", reduced: 0 → 255, c → c − 1; 150 classes);
  class names from `objectInfo150.txt` when present.
* Pascal VOC 2012 — `VOC2012/JPEGImages/*.jpg`, `SegmentationClass/*.png` (palette PNGs, 255 = boundary),
  `ImageSets/Segmentation/{train,val}.txt`; with `SegmentationClassAug/` and an augmented list
  (`ImageSets/Segmentation/train_aug.txt`, or mmseg's `aug.txt` added to `train.txt`) the training split is
  the 10 582-image augmented set; 21 classes with background.
* Cityscapes — `leftImg8bit/{train,val}/<city>/*_leftImg8bit.png` with `gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`
  (19 classes), or `*_gtFine_labelIds.png` mapped to train ids (every other id → 255).

Depth (each sample: normalised image, depth (H, W) float metres, 0 = no measurement):

* NYU-Depth v2 — the labelled `nyu_depth_v2_labeled.mat` (+ `splits.mat`, 795 train / 654 test; read with
  h5py for the v7.3 file or scipy for v5 files), or the common PNG split of the Monocular-Depth-Estimation-
  Toolbox / BTS: `nyu_train.txt` / `nyu_test.txt` of "rgb_path depth_path focal" lines relative to the root,
  16-bit depth PNGs in millimetres.
* KITTI, Eigen split — `kitti_eigen_train.txt` / `kitti_eigen_test.txt` of "image depth focal" lines,
  images under `input/`, depth under `gt_depth/` (16-bit PNGs, metres × 256, 0 = no LiDAR point; lines
  whose depth is `None` are skipped).  Images and depth are KB-cropped to 352 × 1216 (bottom, centred).

Also `demo`: the procedural demo images with their known masks (`ensure_demo_segmentation`; background +
the 8 patterns), generated when no folder is given.

A folder not in the expected layout is a one-line UserError naming what is missing.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dino.errors import UserError
from dino.eval.dense_metrics import IGNORE_INDEX, remap_labels
from dino.log import get_logger

logger = get_logger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
# Cityscapes labelIds → trainIds (cityscapesScripts `labels.py`); every other id is ignored
CITYSCAPES_ID_TO_TRAINID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}

SEGMENTATION_DATASETS = ("ade20k", "voc2012", "cityscapes", "demo")
DEPTH_DATASETS = ("nyu", "kitti")


def _cityscapes_label_map() -> dict[int, int]:
    return {i: CITYSCAPES_ID_TO_TRAINID.get(i, IGNORE_INDEX) for i in range(256)}


# ------------------------------------------------------------------------------------------- files


@dataclass
class SegmentationFiles:
    """The (image, label) file pairs of one split and how its labels are read."""

    name: str
    images: list[str]
    labels: list[str]
    num_classes: int
    class_names: list[str]
    reduce_zero_label: bool = False
    label_map: dict[int, int] | None = None


def _layout_error(dataset: str, root: str, missing: str, expected: str) -> UserError:
    return UserError(f"{root} is not a {dataset} folder: {missing} is missing (expected {expected})")


def _read_list(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _find_root(root: str, marker: str, candidates: Sequence[str]) -> str | None:
    """`root` itself or one of its `candidates` sub-folders, whichever holds `marker`."""
    for sub in ("", *candidates):
        folder = os.path.join(root, sub) if sub else root
        if os.path.exists(os.path.join(folder, marker)):
            return folder
    return None


def ade20k_files(root: str, split: str) -> SegmentationFiles:
    folder = _find_root(root, "images", ("ADEChallengeData2016",))
    expected = "ADEChallengeData2016/images/{training,validation}/*.jpg and annotations/{training,validation}/*.png"
    if folder is None:
        raise _layout_error("ADE20K", root, "images/", expected)
    sub = {"train": "training", "val": "validation"}[split]
    image_dir, label_dir = os.path.join(folder, "images", sub), os.path.join(folder, "annotations", sub)
    for path in (image_dir, label_dir):
        if not os.path.isdir(path):
            raise _layout_error("ADE20K", root, os.path.relpath(path, root), expected)
    stems = sorted(
        os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.lower().endswith((".jpg", ".jpeg", ".png"))
    )
    if not stems:
        raise _layout_error("ADE20K", root, f"any image in {os.path.relpath(image_dir, root)}", expected)
    images, labels = [], []
    for stem in stems:
        label = os.path.join(label_dir, stem + ".png")
        if not os.path.isfile(label):
            raise _layout_error("ADE20K", root, os.path.relpath(label, root), expected)
        image = next(
            os.path.join(image_dir, stem + ext)
            for ext in (".jpg", ".jpeg", ".png")
            if os.path.isfile(os.path.join(image_dir, stem + ext))
        )
        images.append(image)
        labels.append(label)
    return SegmentationFiles("ade20k", images, labels, 150, _ade20k_class_names(folder), reduce_zero_label=True)


def _ade20k_class_names(folder: str) -> list[str]:
    """The first name of each class from the devkit's objectInfo150.txt (tab separated) or .csv
    ("Idx, Ratio, Train, Val, Name"), when one sits beside images/; class indices otherwise."""
    import csv

    for file, delimiter in (("objectInfo150.txt", "\t"), ("objectInfo150.csv", ",")):
        path = os.path.join(folder, file)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", newline="") as handle:
            rows = [row for row in csv.reader(handle, delimiter=delimiter) if row][1:]
        if len(rows) == 150 and all(len(r) >= 5 for r in rows):
            return [r[4].split(";")[0].strip() for r in rows]
    return [str(i) for i in range(150)]


def voc2012_files(root: str, split: str) -> SegmentationFiles:
    folder = _find_root(root, "JPEGImages", ("VOC2012", os.path.join("VOCdevkit", "VOC2012")))
    expected = (
        "VOC2012/JPEGImages, SegmentationClass (or SegmentationClassAug) and "
        "ImageSets/Segmentation/{train,val}.txt (train_aug.txt for the augmented set)"
    )
    if folder is None:
        raise _layout_error("Pascal VOC 2012", root, "JPEGImages/", expected)
    lists = os.path.join(folder, "ImageSets", "Segmentation")
    label_dir = os.path.join(folder, "SegmentationClass")
    aug_dir = os.path.join(folder, "SegmentationClassAug")
    if split == "train" and os.path.isdir(aug_dir) and os.path.isfile(os.path.join(lists, "train_aug.txt")):
        names, label_dir = _read_list(os.path.join(lists, "train_aug.txt")), aug_dir
    elif split == "train" and os.path.isdir(aug_dir) and os.path.isfile(os.path.join(lists, "aug.txt")):
        names = list(
            dict.fromkeys(_read_list(os.path.join(lists, "train.txt")) + _read_list(os.path.join(lists, "aug.txt")))
        )
        label_dir = aug_dir
    else:
        list_file = os.path.join(lists, f"{split}.txt")
        if not os.path.isfile(list_file):
            raise _layout_error("Pascal VOC 2012", root, os.path.relpath(list_file, root), expected)
        names = _read_list(list_file)
    images, labels = [], []
    for name in names:
        image = os.path.join(folder, "JPEGImages", name + ".jpg")
        label = os.path.join(label_dir, name + ".png")
        if split != "train" and not os.path.isfile(label) and os.path.isfile(os.path.join(aug_dir, name + ".png")):
            label = os.path.join(aug_dir, name + ".png")
        for path in (image, label):
            if not os.path.isfile(path):
                raise _layout_error("Pascal VOC 2012", root, os.path.relpath(path, root), expected)
        images.append(image)
        labels.append(label)
    return SegmentationFiles("voc2012", images, labels, 21, list(VOC_CLASSES))


def cityscapes_files(root: str, split: str) -> SegmentationFiles:
    expected = "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png (or _labelIds.png)"
    image_root, label_root = os.path.join(root, "leftImg8bit", split), os.path.join(root, "gtFine", split)
    for path in (image_root, label_root):
        if not os.path.isdir(path):
            raise _layout_error("Cityscapes", root, os.path.relpath(path, root), expected)
    images, labels, mapped = [], [], None
    for city in sorted(os.listdir(image_root)):
        city_dir = os.path.join(image_root, city)
        if not os.path.isdir(city_dir):
            continue
        for file in sorted(os.listdir(city_dir)):
            if not file.endswith("_leftImg8bit.png"):
                continue
            stem = file[: -len("_leftImg8bit.png")]
            train_ids = os.path.join(label_root, city, stem + "_gtFine_labelTrainIds.png")
            label_ids = os.path.join(label_root, city, stem + "_gtFine_labelIds.png")
            if os.path.isfile(train_ids) and mapped is not True:
                labels.append(train_ids)
                mapped = False
            elif os.path.isfile(label_ids) and mapped is not False:
                labels.append(label_ids)
                mapped = True
            else:
                raise _layout_error("Cityscapes", root, os.path.relpath(train_ids, root), expected)
            images.append(os.path.join(city_dir, file))
    if not images:
        raise _layout_error(
            "Cityscapes", root, f"any *_leftImg8bit.png in {os.path.relpath(image_root, root)}", expected
        )
    return SegmentationFiles(
        "cityscapes",
        images,
        labels,
        19,
        list(CITYSCAPES_CLASSES),
        label_map=_cityscapes_label_map() if mapped else None,
    )


# ------------------------------------------------------------------------- the demo segmentation set

# Patterns that fill the whole picture (textures): every pixel is the class.  The others are shapes on a
# background: the shape's pixels (coverage > ½) are the class, the rest is class 0 "background".
DEMO_TEXTURES = ("checkerboard", "concentric_rings", "dot_grid", "horizontal_stripes", "vertical_stripes")


def demo_segmentation_mask(pattern: str, seed, image_size: int) -> np.ndarray:
    """The known mask of `make_demo_image(pattern, seed, image_size)`: (H, W) uint8, 1 + the pattern's index
    in DEMO_PATTERNS on its pixels, 0 elsewhere; the generator's random draws are replayed to get its coverage."""
    from dino.data import demo_dataset

    class_id = 1 + demo_dataset.DEMO_PATTERNS.index(pattern)
    if pattern in DEMO_TEXTURES:
        return np.full((image_size, image_size), class_id, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    centres = (np.arange(image_size) + 0.5) / image_size
    coverage = demo_dataset._PATTERNS[pattern](rng, np.meshgrid(centres, centres), 1.0 / image_size)
    return np.where(coverage > 0.5, class_id, 0).astype(np.uint8)


def ensure_demo_segmentation(
    root: str | None = None, train_per_class: int = 80, val_per_class: int = 20, image_size: int = 64, seed: int = 0
) -> str:
    """The demo dataset's images (the same seeds, so its val split is the classification demo's val split)
    with their known masks, in `<root>/<tag>/{images,annotations}/{training,validation}/NNNN.png` plus
    `classes.txt`: 9 classes, background + the 8 patterns.  Generated once (in a staging folder renamed
    into place), then reused."""
    from dino.data import demo_dataset
    from dino.io import atomic_write_text

    root = root or os.path.join(os.path.dirname(demo_dataset.default_cache_root()), "demo_segmentation")
    tag = f"v{demo_dataset.GENERATOR_VERSION}-train{train_per_class}-val{val_per_class}-px{image_size}-seed{seed}"
    folder = os.path.join(root, tag)
    if os.path.isfile(os.path.join(folder, "classes.txt")):
        return folder
    os.makedirs(root, exist_ok=True)
    import shutil
    import tempfile

    staging = tempfile.mkdtemp(prefix=f".{tag}.", dir=root)
    try:
        for split_id, (split, per_class) in enumerate((("training", train_per_class), ("validation", val_per_class))):
            os.makedirs(os.path.join(staging, "images", split))
            os.makedirs(os.path.join(staging, "annotations", split))
            for class_id, pattern in enumerate(demo_dataset.DEMO_PATTERNS):
                for index in range(per_class):
                    key = (seed, split_id, class_id, index)
                    name = f"{pattern}_{index:04d}.png"
                    demo_dataset.make_demo_image(pattern, key, image_size).save(
                        os.path.join(staging, "images", split, name)
                    )
                    Image.fromarray(demo_segmentation_mask(pattern, key, image_size)).save(
                        os.path.join(staging, "annotations", split, name)
                    )
        atomic_write_text(
            os.path.join(staging, "classes.txt"), "\n".join(("background",) + demo_dataset.DEMO_PATTERNS) + "\n"
        )
        try:
            os.rename(staging, folder)
        except OSError:  # another process put its copy in place first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def demo_files(root: str, split: str) -> SegmentationFiles:
    """The demo segmentation set (`ensure_demo_segmentation`); an empty root generates the default one."""
    if not root:
        root = ensure_demo_segmentation()
        logger.info(f"no --data_path given: the demo segmentation set at {root}")
    classes_file = os.path.join(root, "classes.txt")
    expected = "{images,annotations}/{training,validation}/*.png and classes.txt (written by ensure_demo_segmentation)"
    if not os.path.isfile(classes_file):
        raise _layout_error("demo segmentation", root, "classes.txt", expected)
    sub = {"train": "training", "val": "validation"}[split]
    image_dir, label_dir = os.path.join(root, "images", sub), os.path.join(root, "annotations", sub)
    if not os.path.isdir(image_dir) or not os.path.isdir(label_dir):
        raise _layout_error("demo segmentation", root, f"images/{sub} or annotations/{sub}", expected)
    names = sorted(f for f in os.listdir(image_dir) if f.endswith(".png"))
    classes = _read_list(classes_file)
    return SegmentationFiles(
        "demo",
        [os.path.join(image_dir, n) for n in names],
        [os.path.join(label_dir, n) for n in names],
        len(classes),
        classes,
    )


def segmentation_files(dataset: str, root: str, split: str) -> SegmentationFiles:
    if dataset == "demo":
        return demo_files(root, split)
    if not root or not os.path.isdir(root):
        raise UserError(f"--data_path {root!r} is not a folder (the {dataset} dataset root)")
    readers: dict[str, Callable[[str, str], SegmentationFiles]] = dict(
        ade20k=ade20k_files, voc2012=voc2012_files, cityscapes=cityscapes_files
    )
    if dataset not in readers:
        raise UserError(f"unknown segmentation dataset {dataset!r}; choose one of {', '.join(readers)}")
    return readers[dataset](root, split)


# ------------------------------------------------------------------------------------- augmentation


def to_normalized_tensor(image: Image.Image | np.ndarray) -> Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


def rescale_factor(height: int, width: int, scale: Sequence[int]) -> float:
    """mmcv's keep-ratio rescale: the largest factor that fits the image in (long, short) = `scale`."""
    long_edge, short_edge = max(scale), min(scale)
    return min(long_edge / max(height, width), short_edge / min(height, width))


def photometric_distortion(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """mmseg's PhotoMetricDistortion: brightness ±32, contrast ×[0.5, 1.5] (before or after the HSV steps),
    saturation ×[0.5, 1.5], hue ±18 (OpenCV's 0–180 scale), each with probability ½."""
    image = image.astype(np.float32)
    if rng.random() < 0.5:
        image = image + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5

    def contrast(x):
        return x * rng.uniform(0.5, 1.5) if rng.random() < 0.5 else x

    if contrast_first:
        image = contrast(image)
    saturate, shift_hue = rng.random() < 0.5, rng.random() < 0.5
    if saturate or shift_hue:
        hsv = np.asarray(Image.fromarray(image.clip(0, 255).astype(np.uint8)).convert("HSV"), dtype=np.float32)
        if saturate:
            hsv[..., 1] = (hsv[..., 1] * rng.uniform(0.5, 1.5)).clip(0, 255)
        if shift_hue:  # PIL's hue is 0..255 for 360 degrees; ±18 on OpenCV's 0..180 scale is ±36 degrees
            hsv[..., 0] = (hsv[..., 0] + rng.randint(-18, 18) * 256 / 180) % 256
        image = np.asarray(Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB"), dtype=np.float32)
    if not contrast_first:
        image = contrast(image)
    return image.clip(0, 255).astype(np.uint8)


@dataclass
class SegTrainAugmentation:
    """mmseg's ADE20K training pipeline: keep-ratio resize of `scale` × U(ratio_range), random crop
    (at most `cat_max_ratio` of the crop one class, 10 tries), flip ½, photometric distortion, normalise,
    pad to the crop (image 0, label 255)."""

    crop_size: tuple[int, int]
    scale: tuple[int, int]  # the values: eval/segmentation.yaml, section `augmentation`
    ratio_range: tuple[float, float]
    cat_max_ratio: float
    photometric: bool

    def __call__(self, image: Image.Image, label: np.ndarray, rng: random.Random) -> tuple[Tensor, Tensor]:
        ratio = rng.uniform(*self.ratio_range)
        factor = rescale_factor(image.height, image.width, [s * ratio for s in self.scale])
        size = (max(1, int(image.width * factor + 0.5)), max(1, int(image.height * factor + 0.5)))
        image = image.resize(size, Image.BILINEAR)
        label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize(size, Image.NEAREST), dtype=np.int64)
        crop_h, crop_w = self.crop_size
        image_np = np.asarray(image)

        def crop_box():
            top = rng.randint(0, max(label.shape[0] - crop_h, 0))
            left = rng.randint(0, max(label.shape[1] - crop_w, 0))
            return top, left

        top, left = crop_box()
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                window = label[top : top + crop_h, left : left + crop_w]
                _, counts = np.unique(window[window != IGNORE_INDEX], return_counts=True)
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = crop_box()
        image_np = image_np[top : top + crop_h, left : left + crop_w]
        label = label[top : top + crop_h, left : left + crop_w]
        if rng.random() < 0.5:
            image_np, label = image_np[:, ::-1], label[:, ::-1]
        if self.photometric:
            image_np = photometric_distortion(np.ascontiguousarray(image_np), rng)
        tensor = to_normalized_tensor(image_np)
        label_t = torch.from_numpy(np.ascontiguousarray(label)).long()
        pad_h, pad_w = crop_h - tensor.shape[1], crop_w - tensor.shape[2]
        if pad_h > 0 or pad_w > 0:
            tensor = F.pad(tensor, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=0.0)
            label_t = F.pad(label_t, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=IGNORE_INDEX)
        return tensor, label_t


class SegmentationDataset(Dataset):
    """Training: (augmented crop, label crop).  Evaluation (`augmentation=None`): (the image resized to
    `test_scale` keeping its ratio, the label at its original size, index)."""

    def __init__(
        self,
        files: SegmentationFiles,
        augmentation: SegTrainAugmentation | None = None,
        test_scale: Sequence[int] | None = None,
        seed: int = 0,
    ):
        self.files = files
        self.augmentation = augmentation
        self.test_scale = tuple(test_scale) if test_scale else None
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files.images)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        with Image.open(self.files.images[index]) as image:
            image = image.convert("RGB")
        with Image.open(self.files.labels[index]) as label_image:
            label = np.asarray(label_image, dtype=np.int64)
        if label.ndim == 3:
            label = label[..., 0]
        label = remap_labels(torch.from_numpy(label), self.files.label_map, self.files.reduce_zero_label).numpy()
        if label.shape != (image.height, image.width):
            raise UserError(
                f"{self.files.labels[index]} is {label.shape[1]}x{label.shape[0]} but its image "
                f"{self.files.images[index]} is {image.width}x{image.height}"
            )
        return image, label

    def __getitem__(self, index: int):
        image, label = self.load(index)
        if self.augmentation is not None:
            rng = random.Random(hash((self.seed, self.epoch, index)))
            return self.augmentation(image, label, rng)
        if self.test_scale:
            factor = rescale_factor(image.height, image.width, self.test_scale)
            image = image.resize(
                (max(1, int(image.width * factor + 0.5)), max(1, int(image.height * factor + 0.5))), Image.BILINEAR
            )
        return to_normalized_tensor(image), torch.from_numpy(label).long(), index


# ------------------------------------------------------------------------------------------- depth


@dataclass
class DepthFiles:
    name: str
    images: list[str]
    depths: list[str]
    depth_scale: float = 1000.0
    kb_crop: bool = False
    mat_path: str | None = None  # NYU labelled .mat: images/depths come from it (indices in `mat_indices`)
    mat_indices: list[int] | None = None


def _split_lines(
    root: str, list_file: str, image_prefix: str = "", depth_prefix: str = ""
) -> tuple[list[str], list[str]]:
    images, depths, skipped = [], [], 0
    for line in _read_list(list_file):
        parts = line.split()
        if len(parts) < 2:
            raise UserError(f"{list_file}: line {line!r} is not 'image depth [focal]'")
        if parts[1] == "None":
            skipped += 1
            continue
        images.append(os.path.join(root, image_prefix, parts[0].lstrip("/\\")))
        depths.append(os.path.join(root, depth_prefix, parts[1].lstrip("/\\")))
    if skipped:
        logger.info(f"{os.path.basename(list_file)}: {skipped} lines without depth skipped")
    for path in images[:1] + depths[:1]:
        if not os.path.isfile(path):
            raise UserError(
                f"{path} (listed in {list_file}) does not exist; paths in the list are relative to "
                f"{os.path.join(root, image_prefix or depth_prefix) if image_prefix else root}"
            )
    return images, depths


def nyu_files(root: str, split: str) -> DepthFiles:
    mat = os.path.join(root, "nyu_depth_v2_labeled.mat")
    if os.path.isfile(mat):
        splits = os.path.join(root, "splits.mat")
        if not os.path.isfile(splits):
            raise UserError(
                f"{root} holds nyu_depth_v2_labeled.mat but not splits.mat (the official train/test indices)"
            )
        from scipy.io import loadmat

        key = {"train": "trainNdxs", "val": "testNdxs"}[split]
        indices = [int(i) - 1 for i in np.asarray(loadmat(splits)[key]).reshape(-1)]  # 1-based in the file
        return DepthFiles("nyu", [], [], mat_path=mat, mat_indices=indices)
    list_file = os.path.join(root, {"train": "nyu_train.txt", "val": "nyu_test.txt"}[split])
    if not os.path.isfile(list_file):
        raise UserError(
            f"{root} is not an NYU-Depth v2 folder: neither nyu_depth_v2_labeled.mat (+ splits.mat) nor "
            f"{os.path.basename(list_file)} (lines 'rgb_path depth_path focal', 16-bit depth PNGs in mm)"
        )
    images, depths = _split_lines(root, list_file)
    return DepthFiles("nyu", images, depths, depth_scale=1000.0)


def kitti_files(root: str, split: str) -> DepthFiles:
    list_file = os.path.join(root, {"train": "kitti_eigen_train.txt", "val": "kitti_eigen_test.txt"}[split])
    for path, what in (
        (list_file, os.path.basename(list_file)),
        (os.path.join(root, "input"), "input/"),
        (os.path.join(root, "gt_depth"), "gt_depth/"),
    ):
        if not os.path.exists(path):
            raise UserError(
                f"{root} is not a KITTI (Eigen split) folder: {what} is missing (expected "
                "kitti_eigen_{train,test}.txt listing 'image depth focal', images under input/, "
                "16-bit depth PNGs (m x 256) under gt_depth/)"
            )
    images, depths = _split_lines(root, list_file, "input", "gt_depth")
    return DepthFiles("kitti", images, depths, depth_scale=256.0, kb_crop=True)


def depth_files(dataset: str, root: str, split: str) -> DepthFiles:
    if not root or not os.path.isdir(root):
        raise UserError(f"--data_path {root!r} is not a folder (the {dataset} dataset root)")
    if dataset == "nyu":
        return nyu_files(root, split)
    if dataset == "kitti":
        return kitti_files(root, split)
    raise UserError(f"unknown depth dataset {dataset!r}; choose one of {', '.join(DEPTH_DATASETS)}")


class _NYUMat:
    """Lazy reader of the labelled NYU .mat: h5py for the official v7.3 (HDF5) file, scipy for v5 files.
    Returns (H, W, 3) uint8 images and (H, W) float32 depths in metres."""

    def __init__(self, path: str):
        self.path = path
        self._h5 = None
        self._arrays = None

    def _open(self):
        if self._h5 is None and self._arrays is None:
            try:
                from scipy.io import loadmat

                data = loadmat(self.path, variable_names=["images", "depths"])
                self._arrays = (data["images"], data["depths"])  # MATLAB order: (H, W, 3, N), (H, W, N)
            except (NotImplementedError, ValueError):  # v7.3 files are HDF5 (scipy reads v4-v7.2 only)
                try:
                    import h5py
                except ImportError:
                    raise UserError(f"{self.path} is a MATLAB v7.3 (HDF5) file: install h5py to read it") from None
                self._h5 = h5py.File(self.path, "r")

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        self._open()
        if self._arrays is not None:
            images, depths = self._arrays
            return np.ascontiguousarray(images[..., index]), np.asarray(depths[..., index], dtype=np.float32)
        image = np.asarray(self._h5["images"][index])  # HDF5 order: (3, W, H)
        depth = np.asarray(self._h5["depths"][index], dtype=np.float32)  # (W, H)
        return np.ascontiguousarray(image.transpose(2, 1, 0)), np.ascontiguousarray(depth.T)


def kb_crop_box(height: int, width: int, crop: tuple[int, int] = (352, 1216)) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of KITTI's KB crop: 352 × 1216 at the bottom, centred horizontally."""
    top = max(height - crop[0], 0)
    left = max((width - crop[1]) // 2, 0)
    return top, left, min(top + crop[0], height), min(left + crop[1], width)


@dataclass
class DepthTrainAugmentation:
    """The toolbox's NYU / KITTI training pipeline: (NYUCrop rows 45:472, cols 43:608 for NYU), rotation
    ±2.5° with probability ½, flip ½, random crop, ColorAug (γ, brightness, per-channel colour) with probability `color_prob`."""

    crop_size: tuple[int, int]
    nyu_crop: bool
    rotate_degree: float  # the values: eval/depth.yaml, per dataset
    brightness_range: tuple[float, float]
    color_prob: float

    def __call__(self, image: np.ndarray, depth: np.ndarray, rng: random.Random) -> tuple[Tensor, Tensor]:
        if self.nyu_crop and image.shape[:2] == (480, 640):
            image, depth = image[45:472, 43:608], depth[45:472, 43:608]
        if rng.random() < 0.5:
            angle = rng.uniform(-self.rotate_degree, self.rotate_degree)
            image = np.asarray(Image.fromarray(image).rotate(angle, Image.BILINEAR))
            depth = np.asarray(Image.fromarray(depth.astype(np.float32), mode="F").rotate(angle, Image.NEAREST))
        if rng.random() < 0.5:
            image, depth = image[:, ::-1], depth[:, ::-1]
        crop_h, crop_w = min(self.crop_size[0], depth.shape[0]), min(self.crop_size[1], depth.shape[1])
        top = rng.randint(0, depth.shape[0] - crop_h)
        left = rng.randint(0, depth.shape[1] - crop_w)
        image = image[top : top + crop_h, left : left + crop_w].astype(np.float32) / 255.0
        depth = depth[top : top + crop_h, left : left + crop_w]
        if rng.random() < self.color_prob:
            image = image ** rng.uniform(0.9, 1.1)
            image = image * rng.uniform(*self.brightness_range)
            image = image * np.array([rng.uniform(0.9, 1.1) for _ in range(3)], dtype=np.float32)
            image = image.clip(0, 1)
        return to_normalized_tensor((image * 255.0).astype(np.float32).clip(0, 255)), torch.from_numpy(
            np.ascontiguousarray(depth, dtype=np.float32)
        )


class DepthDataset(Dataset):
    """Training: (augmented crop, depth crop).  Evaluation (`augmentation=None`): (image, depth at full size,
    index) — for KITTI the image is KB-cropped and the prediction is pasted back into the full map."""

    def __init__(self, files: DepthFiles, augmentation: DepthTrainAugmentation | None = None, seed: int = 0):
        self.files = files
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0
        self._mat = _NYUMat(files.mat_path) if files.mat_path else None

    def __len__(self) -> int:
        return len(self.files.mat_indices) if self._mat is not None else len(self.files.images)

    def name(self, index: int) -> str:
        if self._mat is not None:
            return f"nyu_labeled_{self.files.mat_indices[index]:04d}"
        return os.path.relpath(self.files.images[index], os.path.dirname(os.path.dirname(self.files.images[index])))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._mat is not None:
            return self._mat.get(self.files.mat_indices[index])
        with Image.open(self.files.images[index]) as image:
            image = np.asarray(image.convert("RGB"))
        with Image.open(self.files.depths[index]) as depth_image:
            depth = np.asarray(depth_image, dtype=np.float32) / self.files.depth_scale
        if depth.shape != image.shape[:2]:
            raise UserError(
                f"{self.files.depths[index]} is {depth.shape[1]}x{depth.shape[0]} but its image is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        return image, depth

    def __getitem__(self, index: int):
        image, depth = self.load(index)
        if self.augmentation is not None:
            if self.files.kb_crop:
                top, left, bottom, right = kb_crop_box(*depth.shape)
                image, depth = image[top:bottom, left:right], depth[top:bottom, left:right]
            rng = random.Random(hash((self.seed, self.epoch, index)))
            return self.augmentation(np.ascontiguousarray(image), np.ascontiguousarray(depth), rng)
        box = kb_crop_box(*depth.shape) if self.files.kb_crop else (0, 0, *depth.shape)
        image = image[box[0] : box[2], box[1] : box[3]]
        return to_normalized_tensor(np.ascontiguousarray(image)), torch.from_numpy(depth), torch.tensor(box), index


def denormalize(image: Tensor) -> np.ndarray:
    """(3, H, W) normalised tensor → (H, W, 3) uint8 picture."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image.detach().float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def palette(num_classes: int) -> np.ndarray:
    """Distinct colours per class (Pascal VOC's bit-interleaved palette), ignore = black."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for shift in range(8):
            r |= ((c >> 0) & 1) << (7 - shift)
            g |= ((c >> 1) & 1) << (7 - shift)
            b |= ((c >> 2) & 1) << (7 - shift)
            c >>= 3
        colours[index] = (r, g, b)
    colours[IGNORE_INDEX] = 255  # ignore: white
    return colours


def grid_size(n: int) -> int:
    return max(1, math.ceil(math.sqrt(n)))
