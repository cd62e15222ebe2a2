"""Images → features, resumable, for folders of millions of images.

Output folder layout (`extract_features_to_folder`):

    chunks/00000.npy, chunks/00000.txt   one chunk of `chunk_size` input images: features and the paths
                                         that were read (a corrupt file is left out and listed in
                                         chunks/00000.skipped); written atomically, so a chunk either
                                         exists completely or not at all
    features.npy | features.safetensors  all features (N, D) float32, in input order, corrupt files removed
    paths.txt                            the N image paths, row i ↔ features[i]
    skipped.txt                          the corrupt / unreadable files
    meta.json                            model, transform and feature settings (used by `dino search`)
    settings.json, inputs.txt            what the chunks were made from; a rerun with other inputs or settings is refused

Running again with the same output folder skips every chunk already written (resume after an interruption)
and only rebuilds the merged files.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dino.data.datasets import CorruptImageError, list_images, load_image, read_file_list
from dino.errors import UserError, require_path

FEATURE_KINDS = ("cls", "patch_mean", "cls_patch_mean")
OUTPUT_FORMATS = ("npy", "safetensors")


@dataclass
class ExtractionSettings:
    """What each feature row is and how the files are written."""

    features: str = "cls"            # cls | patch_mean | cls_patch_mean (concatenated)
    normalize: bool = True           # L2-normalise each row (what cosine retrieval wants)
    batch_size: int = 64
    num_workers: int = 4
    chunk_size: int = 4096           # images per resumable chunk
    output_format: str = "npy"       # npy | safetensors
    progress: bool = True
    extra_meta: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.features not in FEATURE_KINDS:
            raise UserError(f"unknown feature kind {self.features!r}; choose one of {', '.join(FEATURE_KINDS)}")
        if self.output_format not in OUTPUT_FORMATS:
            raise UserError(f"unknown output format {self.output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise UserError("batch_size and chunk_size must be positive")


def list_input_images(source: str | os.PathLike) -> list[str]:
    """The images of a folder (recursive, sorted) or of a `.txt` list (in its order)."""
    source = require_path(source, "image source")
    if os.path.isdir(source):
        paths = list_images(source)
    elif source.lower().endswith(".txt"):
        paths = read_file_list(source)
    else:
        raise UserError(f"image source must be a folder or a .txt file list, got {source}")
    if not paths:
        raise UserError(f"no images found in {source}")
    return paths


class PathDataset(Dataset):
    """`dataset[i]` → (image tensor, i, True), or (zeros, i, False) when image i cannot be read.

    Unlike the training datasets, a bad file is not replaced by its neighbour: every feature row must
    belong to the path written next to it.
    """

    def __init__(self, paths: Sequence[str], transform: Callable, image_size: int):
        self.paths = list(paths)
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(load_image(self.paths[index])), index, True
        except CorruptImageError:
            return torch.zeros(3, self.image_size, self.image_size), index, False


def pool_features(cls: Tensor, patch_tokens: Tensor, kind: str, normalize: bool) -> Tensor:
    """One row per image from the final-norm [CLS] and patch tokens."""
    if kind == "cls":
        out = cls
    elif kind == "patch_mean":
        out = patch_tokens.mean(dim=1)
    else:
        out = torch.cat((cls, patch_tokens.mean(dim=1)), dim=-1)
    out = out.float()
    return F.normalize(out, dim=-1) if normalize else out


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    from dino.io import atomic_save_npy

    atomic_save_npy(path, array)


def _atomic_write_text(path: Path, text: str) -> None:
    from dino.io import atomic_write_text

    atomic_write_text(path, text)


def _chunk_files(chunks_dir: Path, index: int) -> tuple[Path, Path, Path]:
    stem = f"{index:05d}"
    return chunks_dir / f"{stem}.npy", chunks_dir / f"{stem}.txt", chunks_dir / f"{stem}.skipped"


@torch.inference_mode()
def _extract_chunk(model: nn.Module, paths: Sequence[str], transform: Callable, image_size: int, device: torch.device,
                   input_dtype: torch.dtype, settings: ExtractionSettings, bar: tqdm | None) -> tuple[np.ndarray, list[str], list[str]]:
    loader = DataLoader(PathDataset(paths, transform, image_size), batch_size=settings.batch_size, shuffle=False,
                        num_workers=min(settings.num_workers, os.cpu_count() or 1), pin_memory=device.type == "cuda",
                        prefetch_factor=4 if settings.num_workers > 0 else None)
    rows, good, bad = [], [], []
    for images, indices, ok in loader:
        ok = ok.bool()
        bad.extend(paths[i] for i in indices[~ok].tolist())
        if ok.any():
            images = images[ok].to(device, non_blocking=True).to(input_dtype)
            out = model.forward_features(images)
            rows.append(pool_features(out["x_norm_clstoken"], out["x_norm_patchtokens"], settings.features,
                                      settings.normalize).cpu().numpy())
            good.extend(paths[i] for i in indices[ok].tolist())
        if bar is not None:
            bar.update(len(indices))
    dim = rows[0].shape[1] if rows else 0
    return (np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)), good, bad


def extract_features_to_folder(model: nn.Module, paths: Sequence[str], output_dir: str | os.PathLike, transform: Callable,
                               image_size: int, settings: ExtractionSettings, device: torch.device | str = "cpu",
                               input_dtype: torch.dtype = torch.float32) -> dict:
    """Extract features of `paths` into `output_dir` (layout in the module docstring); returns a summary dict.

    `model` must have `forward_features(images)` (a `VisionTransformer` or an `InferenceViT`) and already sit
    on `device`. Chunks already present in `output_dir/chunks` are reused, not recomputed.
    """
    settings.check()
    device = torch.device(device)
    output = Path(output_dir)
    chunks_dir = output / "chunks"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    list_file = output / "inputs.txt"
    if list_file.exists() and list_file.read_text(encoding="utf-8").splitlines() != list(paths):
        raise UserError(f"{output} holds an extraction of a different image list; use another --output_dir or delete it")
    if not list_file.exists():
        _atomic_write_text(list_file, "\n".join(paths) + "\n")
    # chunks from a run with other feature settings must not be mixed into this one
    identity = json.dumps(dict(features=settings.features, normalize=settings.normalize, image_size=image_size,
                               **settings.extra_meta), sort_keys=True, default=str)
    identity_file = output / "settings.json"
    if identity_file.exists() and identity_file.read_text(encoding="utf-8") != identity:
        raise UserError(f"{output} holds features extracted with other settings ({identity_file}); "
                        "use another --output_dir or delete it")
    if not identity_file.exists():
        _atomic_write_text(identity_file, identity)

    num_chunks = (len(paths) + settings.chunk_size - 1) // settings.chunk_size
    todo = [i for i in range(num_chunks) if not _chunk_files(chunks_dir, i)[1].exists()]
    resumed = num_chunks - len(todo)
    todo_images = sum(len(paths[i * settings.chunk_size:(i + 1) * settings.chunk_size]) for i in todo)
    bar = tqdm(total=todo_images, unit="img", desc="extract", disable=not settings.progress, dynamic_ncols=True)
    start = time.perf_counter()
    for index in todo:
        chunk_paths = list(paths[index * settings.chunk_size:(index + 1) * settings.chunk_size])
        features, good, bad = _extract_chunk(model, chunk_paths, transform, image_size, device, input_dtype, settings, bar)
        npy, txt, skipped = _chunk_files(chunks_dir, index)
        _atomic_save_npy(npy, features.astype(np.float32))
        _atomic_write_text(skipped, "".join(p + "\n" for p in bad))
        _atomic_write_text(txt, "".join(p + "\n" for p in good))  # written last: its presence marks the chunk done
    bar.close()
    seconds = time.perf_counter() - start
    summary = merge_chunks(output, num_chunks, settings)
    summary.update(resumed_chunks=resumed, extracted_images=todo_images, seconds=round(seconds, 2),
                   images_per_second=round(todo_images / seconds, 2) if seconds > 0 and todo_images else None)
    meta = dict(settings=asdict(settings), image_size=image_size, **settings.extra_meta,
                num_features=summary["num_features"], dim=summary["dim"], num_skipped=summary["num_skipped"])
    _atomic_write_text(output / "meta.json", json.dumps(meta, indent=2))
    return summary


def merge_chunks(output: Path, num_chunks: int, settings: ExtractionSettings) -> dict:
    """Concatenate the chunk files into features.(npy|safetensors), paths.txt and skipped.txt."""
    chunks_dir = output / "chunks"
    arrays, paths, skipped = [], [], []
    for index in range(num_chunks):
        npy, txt, bad = _chunk_files(chunks_dir, index)
        arrays.append(np.load(npy))
        paths.extend(txt.read_text(encoding="utf-8").splitlines())
        skipped.extend(bad.read_text(encoding="utf-8").splitlines() if bad.exists() else [])
    dims = {a.shape[1] for a in arrays if len(a)}
    if len(dims) > 1:
        raise UserError(f"chunks in {chunks_dir} have different feature sizes {sorted(dims)}; they come from different "
                        "settings — delete the folder and extract again")
    dim = dims.pop() if dims else 0
    features = np.concatenate([a for a in arrays if len(a)]) if dim else np.zeros((0, 0), np.float32)
    if settings.output_format == "safetensors":
        from safetensors.numpy import save_file

        save_file({"features": np.ascontiguousarray(features)}, str(output / "features.safetensors"))
    else:
        _atomic_save_npy(output / "features.npy", features)
    _atomic_write_text(output / "paths.txt", "".join(p + "\n" for p in paths))
    _atomic_write_text(output / "skipped.txt", "".join(p + "\n" for p in skipped))
    return dict(output_dir=str(output), num_features=int(features.shape[0]), dim=int(dim), num_skipped=len(skipped),
                skipped=skipped)


def load_extracted(folder: str | os.PathLike) -> tuple[np.ndarray, list[str], dict]:
    """(features (N, D) float32, paths, meta) of an extraction folder."""
    folder = Path(require_path(folder, "features folder", must_be_dir=True))
    if (folder / "features.npy").exists():
        features = np.load(folder / "features.npy")
    elif (folder / "features.safetensors").exists():
        from safetensors.numpy import load_file

        features = load_file(str(folder / "features.safetensors"))["features"]
    else:
        raise UserError(f"{folder} holds no features.npy or features.safetensors; run `dino extract` first")
    paths = (folder / "paths.txt").read_text(encoding="utf-8").splitlines()
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").exists() else {}
    if len(paths) != len(features):
        raise UserError(f"{folder}: {len(features)} feature rows but {len(paths)} paths")
    return features.astype(np.float32, copy=False), paths, meta
