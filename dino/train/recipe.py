"""Data-derived choices of the small-data recipe: look at the images, then pick what can be picked from them.

`inspect_images(path)` reads a sample of the training images (count, typical side, grayscale or colour);
`derive_small_data_choices(stats)` turns that into config values with the reason for each:

- **patch size and crop sizes from the image side** s: the patch p is the smallest power of two that keeps the
  global grid at most `max_grid` tokens a side (8: the 8×8 token grids of ViT-on-CIFAR work, patch 4 at 32 px,
  patch 8 at 64 px); the global crop is s rounded to a multiple of p (the training resolution = the image's
  own resolution, never upscaled to 224); local crops are ~3/7 of it (DINO's 96/224), at least 2 patches a side.
- **augmentations from the colour content**: grayscale data gets no solarisation (inverting the bright half
  of a digit or an X-ray is not a nuisance the features should ignore); colour jitter stays (on gray images
  only its brightness/contrast part acts).  Gaussian blur is off below 96 px (the blur radius range of DINO,
  0.1–2 px, is tuned for 224 px crops; solo-learn's CIFAR recipes also use no blur).
- **epochs and warm-up from the dataset size**: a budget of images seen (`recipe.images_seen`) divided by the
  dataset size, clamped to [min_epochs, max_epochs]; warm-up is 10 % of the epochs (at least 1).

`apply_small_data_recipe(cfg)` writes the choices into a config (only keys the user did not set explicitly,
listed in `recipe.keep`) and prints them.  Called by `main_dino.py` when the preset's `recipe.auto` is true.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dino.data.datasets import build_dataset, load_image
from dino.log import get_logger

logger = get_logger(__name__)

SAMPLE_IMAGES = 256


@dataclass
class DataStats:
    """What the recipe needs to know about a training set."""

    num_images: int
    image_side: int  # median of min(width, height) over the sampled images
    grayscale: bool  # every sampled image has R == G == B
    labelled: bool = False

    def describe(self) -> str:
        kind = "grayscale" if self.grayscale else "colour"
        return f"{self.num_images} images, typical side {self.image_side} px, {kind}"


def inspect_images(path: str, sample: int = SAMPLE_IMAGES, seed: int = 0) -> DataStats:
    """Count the images under `path` and look at a seeded sample of them (side, grayscale)."""
    dataset = build_dataset(path)
    files = [p for p, _ in dataset.samples]
    chosen = random.Random(seed).sample(files, min(sample, len(files)))
    sides, gray = [], True
    for file in chosen:
        image = load_image(file)
        sides.append(min(image.size))
        if gray:
            array = np.asarray(image.convert("RGB"), dtype=np.int16)
            gray = bool((array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all())
    labelled = any(label >= 0 for _, label in dataset.samples[:1])
    return DataStats(len(files), int(np.median(sides)), gray, labelled)


def _round_to(value: float, multiple: int, minimum: int) -> int:
    return max(minimum, multiple * int(round(value / multiple)))


@dataclass
class Choice:
    key: str
    value: Any
    why: str


@dataclass
class RecipeChoices:
    choices: list[Choice] = field(default_factory=list)

    def add(self, key: str, value: Any, why: str) -> None:
        self.choices.append(Choice(key, value, why))

    def as_overrides(self) -> dict[str, Any]:
        return {c.key: c.value for c in self.choices}

    def format(self, stats: DataStats, kept: Iterable[str] = ()) -> str:
        kept = set(kept)
        lines = [f"small-data recipe for {stats.describe()}:"]
        for c in self.choices:
            mark = " (kept the value you set)" if c.key in kept else ""
            lines.append(f"  {c.key:<32} {str(c.value):<14} {c.why}{mark}")
        return "\n".join(lines)


def choose_patch_size(side: int, max_grid: int = 8) -> int:
    """Smallest power of two p with side / p <= max_grid (1 for tiny images)."""
    return 1 << max(0, math.ceil(math.log2(max(side, 1) / max_grid)))


def derive_small_data_choices(
    stats: DataStats,
    images_seen: int = 120_000,
    min_epochs: int = 10,
    max_epochs: int = 300,
    max_grid: int = 8,
    patch_size: int | None = None,
) -> RecipeChoices:
    """Config values derived from the data, each with its reason (`patch_size`: given by the user, not derived)."""
    out = RecipeChoices()
    side = stats.image_side
    patch = int(patch_size) if patch_size else choose_patch_size(side, max_grid)
    global_size = _round_to(side, patch, patch * 2)
    local_size = _round_to(global_size * 3 / 7, patch, patch * 2)
    grid = global_size // patch
    out.add("model.patch_size", patch, f"images of {side} px → a {grid}×{grid} token grid (≤ {max_grid} a side)")
    out.add("crops.global_crops_size", global_size, "the images' own resolution (multiple of the patch), not 224")
    out.add(
        "crops.local_crops_size",
        local_size,
        f"~3/7 of the global crop ({local_size // patch}×{local_size // patch} patches)",
    )
    if stats.grayscale:
        out.add("crops.solarization_prob", 0.0, "grayscale data: no solarisation")
    else:
        out.add("crops.solarization_prob", 0.2, "colour data: solarisation on global crop 2 (DINO, solo-learn)")
    if global_size < 96:
        out.add(
            "crops.blur_probs", [0.0, 0.0, 0.0], f"{global_size} px crops: DINO's 0.1–2 px blur is tuned for 224 px"
        )
    epochs = int(min(max_epochs, max(min_epochs, round(images_seen / max(stats.num_images, 1)))))
    out.add(
        "optim.epochs",
        epochs,
        f"≈ {images_seen // 1000}k images seen / {stats.num_images} images (clamped to {min_epochs}–{max_epochs})",
    )
    warmup = max(1, int(round(0.1 * epochs)))
    out.add("optim.warmup_epochs", warmup, "10 % of the epochs")
    out.add("teacher.warmup_teacher_temp_epochs", 0, "constant sharp teacher (no warm-up) for short runs")
    return out


def _explicitly_set(cfg: DictConfig) -> set[str]:
    keep = cfg.get("recipe", {}).get("keep", []) if cfg.get("recipe") is not None else []
    return set(keep or [])


def apply_small_data_recipe(
    cfg: DictConfig,
    data_path: str | None = None,
    stats: DataStats | None = None,
    explicit: Iterable[str] = (),
    verbose: bool = True,
) -> RecipeChoices | None:
    """Fill the data-derived keys of `cfg` in place (except those in `explicit` or `recipe.keep`); print them.

    Returns the choices, or None when the config has no `recipe.auto: true`.
    """
    recipe = cfg.get("recipe")
    if recipe is None or not bool(recipe.get("auto", False)):
        return None
    if stats is None:
        from dino.train.data_pipeline import resolve_data_path

        stats = inspect_images(data_path or resolve_data_path(cfg))
    kept = set(explicit) | _explicitly_set(cfg)
    choices = derive_small_data_choices(
        stats,
        images_seen=int(recipe.get("images_seen", 120_000)),
        min_epochs=int(recipe.get("min_epochs", 10)),
        max_epochs=int(recipe.get("max_epochs", 300)),
        max_grid=int(recipe.get("max_grid", 8)),
        patch_size=int(cfg.model.patch_size) if "model.patch_size" in kept else None,
    )
    for choice in choices.choices:
        if choice.key not in kept:
            OmegaConf.update(cfg, choice.key, choice.value, merge=False)
    if verbose:
        logger.info(choices.format(stats, kept))
    return choices


def explicit_keys_from_argv(argv: Iterable[str], flag_keys: dict[str, str]) -> set[str]:
    """Config keys a command line sets: `key=value` overrides and flags (via `flag_keys`: option → key)."""
    keys = set()
    for token in argv:
        if "=" in token and not token.startswith("-"):
            keys.add(token.split("=", 1)[0].lstrip("+~"))
        else:
            name = token.split("=", 1)[0]
            if name in flag_keys:
                keys.add(flag_keys[name])
    return keys


def suggest_preset(stats: DataStats, current: str) -> str | None:
    """A one-line hint when a folder of small images is trained with a preset made for something else."""
    if current == "small_data" or stats.image_side > 128 or stats.num_images > 200_000:
        return None
    return (
        f"hint: {stats.describe()} — the small_data preset fits this data better than {current!r} "
        f"(python main_dino.py --config small_data --data_path ...)"
    )


# ------------------------------------------------------------------------------------ main_dino.py hooks


def _data_path_from_argv(argv: list[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--data_path" and i + 1 < len(argv):
            return argv[i + 1]
        for prefix in ("--data_path=", "train.data_path="):
            if token.startswith(prefix):
                return token[len(prefix) :]
    return None


def default_preset_for_data(argv: list[str], small_preset: str = "small_data") -> list[str]:
    """`main_dino.py --data_path FOLDER` without `--config`: pick `small_preset` when the images are small.

    Returns argv, with `--config small_data` prepended when the folder holds ≤ 200k images of ≤ 128 px (and a
    line saying so is printed); unchanged otherwise, or when `--config` is given, or the path cannot be read.
    """
    argv = list(argv)
    if any(t == "--config" or t.startswith("--config=") for t in argv) or any(t in ("-h", "--help") for t in argv):
        return argv
    data_path = _data_path_from_argv(argv)
    if not data_path:
        return argv
    try:
        stats = inspect_images(os.path.expanduser(data_path), sample=64)
    except Exception:  # noqa: BLE001 - the training itself reports an unreadable path properly
        return argv
    if stats.image_side > 128 or stats.num_images > 200_000:
        return argv
    logger.info(f"{stats.describe()}: using the {small_preset} preset (--config NAME picks another)")
    return ["--config", small_preset, *argv]


def apply_recipe_for_cli(cfg: DictConfig, argv: list[str], flag_keys: dict[str, str]) -> RecipeChoices | None:
    """After `ConfigCLI.parse`: derive the data-dependent keys (recipe.auto presets only), keeping what argv set."""
    return apply_small_data_recipe(cfg, explicit=explicit_keys_from_argv(argv, flag_keys))
