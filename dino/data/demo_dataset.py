"""A small procedural, labelled image dataset for CPU demos and tests (no download).

Each class is a *shape or texture* — stripes, checkerboard, rings, dots, discs, triangles, rectangles — drawn
with a random foreground and background colour, random position, scale, rotation and phase, a random
brightness gradient and pixel noise.  Foreground and background colours are drawn independently and
uniformly for every image, so the expected mean colour is the same grey for every class: a classifier has
to look at structure, not colour, which is what a self-supervised ViT should learn.

Horizontal vs vertical stripes is the only pair told apart by orientation; horizontal flips (used by the
augmentations) keep both orientations, so no class is defined by left/right chirality.

Defaults (8 classes × 80 train + 20 val images at 64×64 px, about 800 PNG files, a few MB) train a tiny ViT
on a CPU in minutes; kNN accuracy well above the 12.5 % chance level shows that the features learned shape.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from dino.errors import UserError

# Bump when the images produced for a given seed change, so stale caches are not reused.
GENERATOR_VERSION = 1

DEFAULT_NUM_CLASSES = 8
DEFAULT_TRAIN_PER_CLASS = 80
DEFAULT_VAL_PER_CLASS = 20
DEFAULT_IMAGE_SIZE = 64

_COMPLETE_MARKER = "complete.json"
_SPLITS = ("train", "val")

Grid = tuple[np.ndarray, np.ndarray]  # (x, y) pixel-centre coordinates in [0, 1)


# ------------------------------------------------------------------------------------------- drawing


def _soft(signed_distance: np.ndarray, pixel: float) -> np.ndarray:
    """Coverage in [0, 1] from a signed distance (negative inside): a one-pixel anti-aliased edge."""
    return np.clip(0.5 - signed_distance / pixel, 0.0, 1.0)


def _rotate(grid: Grid, angle: float) -> Grid:
    x, y = grid
    c, s = math.cos(angle), math.sin(angle)
    return x * c + y * s, -x * s + y * c


def _wave_coverage(wave: np.ndarray, period: float, pixel: float, threshold: float = 0.0) -> np.ndarray:
    """Square wave from a sine: foreground where sin > threshold, with soft edges one pixel wide."""
    # Near a crossing, sin changes by 2π/period per unit length; convert to pixels for the soft edge.
    return np.clip(0.5 + (wave - threshold) * period / (2 * math.pi * pixel), 0.0, 1.0)


def _stripes(rng: np.random.Generator, grid: Grid, pixel: float, base_angle: float) -> np.ndarray:
    angle = base_angle + math.radians(rng.uniform(-12, 12))
    period = rng.uniform(0.12, 0.3)
    _, v = _rotate(grid, angle)
    wave = np.sin(2 * math.pi * v / period + rng.uniform(0, 2 * math.pi))
    return _wave_coverage(wave, period, pixel, threshold=rng.uniform(-0.3, 0.3))


def _horizontal_stripes(rng, grid, pixel):
    return _stripes(rng, grid, pixel, base_angle=0.0)


def _vertical_stripes(rng, grid, pixel):
    return _stripes(rng, grid, pixel, base_angle=math.pi / 2)


def _checkerboard(rng, grid, pixel):
    cell = rng.uniform(0.1, 0.25)
    u, v = _rotate(grid, math.radians(rng.uniform(-12, 12)))
    phase_u, phase_v = rng.uniform(0, 2 * math.pi, size=2)
    wave = np.sin(math.pi * u / cell + phase_u) * np.sin(math.pi * v / cell + phase_v)
    return _wave_coverage(wave, 2 * cell, pixel)


def _concentric_rings(rng, grid, pixel):
    x, y = grid
    cx, cy = rng.uniform(0.2, 0.8, size=2)
    period = rng.uniform(0.1, 0.22)
    radius = np.hypot(x - cx, y - cy)
    return _wave_coverage(np.sin(2 * math.pi * radius / period + rng.uniform(0, 2 * math.pi)), period, pixel)


def _dot_grid(rng, grid, pixel):
    spacing = rng.uniform(0.14, 0.25)
    dot_radius = rng.uniform(0.2, 0.35) * spacing
    u, v = _rotate(grid, math.radians(rng.uniform(-12, 12)))
    du = np.mod(u / spacing + rng.uniform(0, 1), 1.0) - 0.5
    dv = np.mod(v / spacing + rng.uniform(0, 1), 1.0) - 0.5
    return _soft(np.hypot(du, dv) * spacing - dot_radius, pixel)


def _discs(rng, grid, pixel):
    x, y = grid
    coverage = np.zeros_like(x)
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0.15, 0.85, size=2)
        coverage = np.maximum(coverage, _soft(np.hypot(x - cx, y - cy) - rng.uniform(0.12, 0.28), pixel))
    return coverage


def _triangle(rng, grid, pixel):
    x, y = grid
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    size = rng.uniform(0.2, 0.4)
    start = rng.uniform(0, 2 * math.pi)
    angles = start + np.arange(3) * 2 * math.pi / 3 + np.radians(rng.uniform(-20, 20, size=3))
    radii = size * rng.uniform(0.8, 1.2, size=3)
    vx, vy = cx + radii * np.cos(angles), cy + radii * np.sin(angles)
    # Signed distance to a convex polygon ≈ the largest signed distance to its edge lines (outward normals;
    # the vertices go counter-clockwise because the angles increase).
    distance = np.full_like(x, -np.inf)
    for i in range(3):
        ex, ey = vx[(i + 1) % 3] - vx[i], vy[(i + 1) % 3] - vy[i]
        length = math.hypot(ex, ey)
        nx, ny = ey / length, -ex / length
        distance = np.maximum(distance, (x - vx[i]) * nx + (y - vy[i]) * ny)
    return _soft(distance, pixel)


def _rectangles(rng, grid, pixel):
    x, y = grid
    coverage = np.zeros_like(x)
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0.2, 0.8, size=2)
        half_w, half_h = rng.uniform(0.08, 0.22, size=2)
        u, v = _rotate((x - cx, y - cy), rng.uniform(0, math.pi / 2))
        coverage = np.maximum(coverage, _soft(np.maximum(np.abs(u) - half_w, np.abs(v) - half_h), pixel))
    return coverage


PatternFn = Callable[[np.random.Generator, Grid, float], np.ndarray]

# Class name → drawing function; the class order of the generated ImageFolder is the sorted names.
_PATTERNS: dict[str, PatternFn] = {
    "checkerboard": _checkerboard,
    "concentric_rings": _concentric_rings,
    "discs": _discs,
    "dot_grid": _dot_grid,
    "horizontal_stripes": _horizontal_stripes,
    "rectangles": _rectangles,
    "triangle": _triangle,
    "vertical_stripes": _vertical_stripes,
}
DEMO_PATTERNS: tuple[str, ...] = tuple(sorted(_PATTERNS))


def _distinct_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background colours, uniform in RGB, far enough apart for the pattern to be visible."""
    while True:
        foreground, background = rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=3)
        if np.linalg.norm(foreground - background) >= 0.35:
            return foreground, background


def make_demo_image(
    pattern: str | int, seed: int | Sequence[int] = 0, image_size: int = DEFAULT_IMAGE_SIZE
) -> Image.Image:
    """Draw one RGB image of `pattern` (a name of `DEMO_PATTERNS` or its index); deterministic in `seed`."""
    if isinstance(pattern, int):
        if not 0 <= pattern < len(DEMO_PATTERNS):
            raise ValueError(f"pattern index {pattern} out of range 0..{len(DEMO_PATTERNS) - 1}")
        pattern = DEMO_PATTERNS[pattern]
    if pattern not in _PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose from {DEMO_PATTERNS}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")

    rng = np.random.default_rng(seed)
    centres = (np.arange(image_size) + 0.5) / image_size
    grid = np.meshgrid(centres, centres)  # (x, y), each (H, W)
    pixel = 1.0 / image_size

    coverage = _PATTERNS[pattern](rng, grid, pixel)[..., None]
    foreground, background = _distinct_colours(rng)
    image = background * (1 - coverage) + foreground * coverage
    # Zero-mean brightness gradient and pixel noise: no flat backgrounds, no class-dependent mean shift.
    gx, gy = rng.uniform(-0.15, 0.15, size=2)
    image = image + (gx * (grid[0] - 0.5) + gy * (grid[1] - 0.5))[..., None]
    image = image + rng.normal(0.0, rng.uniform(0.02, 0.08), size=image.shape)
    return Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), mode="RGB")


# -------------------------------------------------------------------------------------------- caching


def default_cache_root() -> str:
    """`$DINO_CACHE_DIR/demo_dataset` when the variable is set, otherwise `~/.cache/dino/demo_dataset`."""
    base = os.environ.get("DINO_CACHE_DIR")
    if base:
        return os.path.join(os.path.expanduser(base), "demo_dataset")
    return os.path.join(os.path.expanduser("~"), ".cache", "dino", "demo_dataset")


def _expected_counts(num_classes: int, train_per_class: int, val_per_class: int) -> dict[str, int]:
    return {"train": num_classes * train_per_class, "val": num_classes * val_per_class}


def _count_images(split_dir: str) -> int:
    if not os.path.isdir(split_dir):
        return -1
    return sum(
        sum(1 for f in os.listdir(os.path.join(split_dir, c)) if f.endswith(".png"))
        for c in os.listdir(split_dir)
        if os.path.isdir(os.path.join(split_dir, c))
    )


def _is_complete(folder: str, params: dict) -> bool:
    marker = os.path.join(folder, _COMPLETE_MARKER)
    try:
        with open(marker, encoding="utf-8") as handle:
            recorded = json.load(handle)
    except (OSError, ValueError):
        return False
    if recorded.get("params") != params:
        return False
    expected = _expected_counts(params["num_classes"], params["train_per_class"], params["val_per_class"])
    return all(_count_images(os.path.join(folder, split)) == n for split, n in expected.items())


def _generate(folder: str, params: dict) -> None:
    for split_id, split in enumerate(_SPLITS):
        per_class = params[f"{split}_per_class"]
        for class_id, name in enumerate(DEMO_PATTERNS[: params["num_classes"]]):
            class_dir = os.path.join(folder, split, name)
            os.makedirs(class_dir, exist_ok=True)
            for index in range(per_class):
                # Seeding by (seed, split, class, index) keeps an image the same when the counts change.
                image = make_demo_image(name, (params["seed"], split_id, class_id, index), params["image_size"])
                image.save(os.path.join(class_dir, f"{index:04d}.png"))
    with open(os.path.join(folder, _COMPLETE_MARKER), "w", encoding="utf-8") as handle:
        json.dump({"params": params, "classes": list(DEMO_PATTERNS[: params["num_classes"]])}, handle, indent=1)


def ensure_demo_dataset(
    root: str | os.PathLike | None = None,
    num_classes: int = DEFAULT_NUM_CLASSES,
    train_per_class: int = DEFAULT_TRAIN_PER_CLASS,
    val_per_class: int = DEFAULT_VAL_PER_CLASS,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> str:
    """Return the folder of the demo dataset, generating it first if it is missing or incomplete.

    The dataset is written to `<root>/<tag>/{train,val}/<class>/NNNN.png`, where `root` defaults to
    `default_cache_root()` and `<tag>` names the generator version and every parameter, so different settings
    never overwrite each other.  Generation goes to a temporary folder that is renamed into place at the end:
    an interrupted run leaves no half-written dataset behind, and concurrent callers (e.g. several ranks)
    end up with one complete copy.  The images are a deterministic function of the parameters.
    """
    if not 1 <= num_classes <= len(DEMO_PATTERNS):
        raise UserError(f"the demo dataset has 1..{len(DEMO_PATTERNS)} classes, asked for {num_classes}")
    if train_per_class < 1 or val_per_class < 1:
        raise UserError("the demo dataset needs at least one train and one val image per class")
    if image_size < 8:
        raise UserError(f"demo image size must be at least 8 px, got {image_size}")
    params = {
        "version": GENERATOR_VERSION,
        "num_classes": int(num_classes),
        "train_per_class": int(train_per_class),
        "val_per_class": int(val_per_class),
        "image_size": int(image_size),
        "seed": int(seed),
    }
    root = os.path.abspath(os.path.expanduser(os.fspath(root))) if root is not None else default_cache_root()
    tag = "v{version}-c{num_classes}-train{train_per_class}-val{val_per_class}-px{image_size}-seed{seed}"
    tag = tag.format(**params)
    folder = os.path.join(root, tag)
    if _is_complete(folder, params):
        return folder

    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{tag}.", dir=root)
    try:
        _generate(staging, params)
        if os.path.exists(folder) and not _is_complete(folder, params):
            shutil.rmtree(folder, ignore_errors=True)  # leftover of an older or interrupted generator
        try:
            os.rename(staging, folder)
        except OSError:
            # Another process renamed its copy into place first; theirs is as good as ours.
            if not _is_complete(folder, params):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
