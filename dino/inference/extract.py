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

from dino.data.datasets import CorruptImageError, list_images, read_file_list
from dino.errors import UserError, require_path

FEATURE_KINDS = ("cls", "patch_mean", "cls_patch_mean")
OUTPUT_FORMATS = ("npy", "safetensors")


@dataclass
class ExtractionSettings:
    """What each feature row is and how the files are written."""

    features: str = "cls"  # cls | patch_mean | cls_patch_mean (concatenated)
    normalize: bool = True  # L2-normalise each row (what cosine retrieval wants)
    batch_size: int = 64
    num_workers: int = 4
    chunk_size: int = 4096  # images per resumable chunk
    output_format: str = "npy"  # npy | safetensors
    progress: bool = True
    extra_meta: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.features not in FEATURE_KINDS:
            raise UserError(f"unknown feature kind {self.features!r}; choose one of {', '.join(FEATURE_KINDS)}")
        if self.output_format not in OUTPUT_FORMATS:
            raise UserError(f"unknown output format {self.output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise UserError("batch_size and chunk_size must be positive")


class EvalTransform:
    """`dino.data.transforms.make_eval_transform` without torchvision: the same tensors, bit for bit.

    Resize the shorter side to `resize_size` (PIL bicubic; the longer side int(size · long / short)), centre crop
    `crop_size` (offsets rounded as torchvision does), /255, ImageNet normalisation. Importing torchvision pulls in
    torch._dynamo (~170 MB of resident memory) that an extraction process does not otherwise need.
    """

    def __init__(self, resize_size: int = 256, crop_size: int = 224):
        if crop_size > resize_size:
            raise ValueError(f"crop_size {crop_size} is larger than resize_size {resize_size}")
        from dino.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        self.resize_size, self.crop_size = int(resize_size), int(crop_size)
        self.min_decode_side = int(resize_size)  # what `load_image_for` may reduce a large image to
        self.mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)

    def __call__(self, image) -> Tensor:
        from PIL import Image

        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        if size != (width, height):
            image = image.resize(size, Image.BICUBIC)
            width, height = size
        crop = self.crop_size
        top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
        image = image.crop((left, top, left + crop, top + crop))
        pixels = torch.from_numpy(np.array(image.convert("RGB"), np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        return pixels.to(torch.float32).div(255).sub_(self.mean).div_(self.std)


def list_input_images(source: str | os.PathLike) -> list[str]:
    """The images of a folder (recursive, sorted) or of a `.txt` list (in its order)."""
    from dino.config_validation import text_list_problem

    source = require_path(source, "image source")
    if os.path.isdir(source):
        paths = list_images(source)
    elif source.lower().endswith(".txt"):
        if problem := text_list_problem(source):
            raise UserError(problem)
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
        from dino.data.transforms import load_image_for, min_decode_side

        try:  # a huge image is decoded only to the size the transform resizes to
            image = load_image_for(self.paths[index], min_decode_side(self.transform))
            return self.transform(image), index, True
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


# The path lists (inputs.txt, paths.txt, skipped.txt, chunks/*.txt) hold one path per line. A file name may
# itself hold a line break (legal on POSIX), which would shift every following row against the features:
# backslash, LF and CR are written escaped (\\, \n, \r) and lines are split on LF only. Ordinary paths are
# written as they are.
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "n": "\n", "r": "\r"}


def encode_path_line(path: str) -> str:
    """`path` as one line of a path list (see above)."""
    if not any(c in path for c in _ESCAPES):
        return path
    return "".join(_ESCAPES.get(c, c) for c in path)


def decode_path_line(line: str) -> str:
    """The path written by `encode_path_line`."""
    if "\\" not in line:
        return line
    out, chars = [], iter(line)
    for c in chars:
        if c == "\\":
            following = next(chars, "")
            out.append(_UNESCAPES.get(following, "\\" + following))
        else:
            out.append(c)
    return "".join(out)


def write_path_list(path: Path, paths: Sequence[str]) -> None:
    _atomic_write_text(path, "".join(encode_path_line(p) + "\n" for p in paths))


def read_path_list(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")  # not splitlines(): it also splits on \x0b, \x1c, \u2028, … which names may hold
    if lines and lines[-1] == "":
        lines.pop()
    return [decode_path_line(line) for line in lines]


def weights_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter and buffer (names, shapes, dtypes, values): what `dino search` compares to
    know that the weights it embeds new queries with are those the features were extracted with."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if tensor.numel():  # hashed through the buffer protocol: no bytes copy of the weights
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _chunk_files(chunks_dir: Path, index: int) -> tuple[Path, Path, Path]:
    stem = f"{index:05d}"
    return chunks_dir / f"{stem}.npy", chunks_dir / f"{stem}.txt", chunks_dir / f"{stem}.skipped"


@torch.inference_mode()
def _extract_chunk(
    model: nn.Module,
    paths: Sequence[str],
    transform: Callable,
    image_size: int,
    device: torch.device,
    input_dtype: torch.dtype,
    settings: ExtractionSettings,
    bar: tqdm | None,
) -> tuple[np.ndarray, list[str], list[str]]:
    loader = DataLoader(
        PathDataset(paths, transform, image_size),
        batch_size=settings.batch_size,
        shuffle=False,
        num_workers=min(settings.num_workers, os.cpu_count() or 1),
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if settings.num_workers > 0 else None,
    )
    rows, good, bad = [], [], []
    for images, indices, ok in loader:
        ok = ok.bool()
        bad.extend(paths[i] for i in indices[~ok].tolist())
        if ok.any():
            images = images[ok].to(device, non_blocking=True).to(input_dtype)
            out = model.forward_features(images)
            rows.append(
                pool_features(out["x_norm_clstoken"], out["x_norm_patchtokens"], settings.features, settings.normalize)
                .cpu()
                .numpy()
            )
            good.extend(paths[i] for i in indices[ok].tolist())
        if bar is not None:
            bar.update(len(indices))
    dim = rows[0].shape[1] if rows else 0
    return (np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)), good, bad


def extract_features_to_folder(
    model: nn.Module,
    paths: Sequence[str],
    output_dir: str | os.PathLike,
    transform: Callable,
    image_size: int,
    settings: ExtractionSettings,
    device: torch.device | str = "cpu",
    input_dtype: torch.dtype = torch.float32,
) -> dict:
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
    if list_file.exists() and read_path_list(list_file) != list(paths):
        raise UserError(
            f"{output} holds an extraction of a different image list; use another --output_dir or delete it"
        )
    if not list_file.exists():
        write_path_list(list_file, paths)
    # chunks from a run with other feature settings must not be mixed into this one
    identity = json.dumps(
        dict(features=settings.features, normalize=settings.normalize, image_size=image_size, **settings.extra_meta),
        sort_keys=True,
        default=str,
    )
    identity_file = output / "settings.json"
    if identity_file.exists() and identity_file.read_text(encoding="utf-8") != identity:
        raise UserError(
            f"{output} holds features extracted with other settings ({identity_file}); "
            "use another --output_dir or delete it"
        )
    if not identity_file.exists():
        _atomic_write_text(identity_file, identity)

    num_chunks = (len(paths) + settings.chunk_size - 1) // settings.chunk_size
    todo = [i for i in range(num_chunks) if not _chunk_files(chunks_dir, i)[1].exists()]
    resumed = num_chunks - len(todo)
    todo_images = sum(len(paths[i * settings.chunk_size : (i + 1) * settings.chunk_size]) for i in todo)
    bar = tqdm(total=todo_images, unit="img", desc="extract", disable=not settings.progress, dynamic_ncols=True)
    start = time.perf_counter()
    for index in todo:
        chunk_paths = list(paths[index * settings.chunk_size : (index + 1) * settings.chunk_size])
        features, good, bad = _extract_chunk(
            model, chunk_paths, transform, image_size, device, input_dtype, settings, bar
        )
        npy, txt, skipped = _chunk_files(chunks_dir, index)
        _atomic_save_npy(npy, features.astype(np.float32))
        write_path_list(skipped, bad)
        write_path_list(txt, good)  # written last: its presence marks the chunk done
    bar.close()
    seconds = time.perf_counter() - start
    summary = merge_chunks(output, num_chunks, settings)
    # what the listing itself could not use (an unreadable sub-folder, a FIFO named like an image) is skipped too
    unlisted = [path for path, _ in getattr(paths, "skipped", [])]
    if unlisted:
        summary["skipped"] = list(summary["skipped"]) + unlisted
        summary["num_skipped"] += len(unlisted)
        write_path_list(output / "skipped.txt", summary["skipped"])
    summary.update(
        resumed_chunks=resumed,
        extracted_images=todo_images,
        seconds=round(seconds, 2),
        images_per_second=round(todo_images / seconds, 2) if seconds > 0 and todo_images else None,
    )
    meta = dict(
        settings=asdict(settings),
        image_size=image_size,
        **settings.extra_meta,
        num_features=summary["num_features"],
        dim=summary["dim"],
        num_skipped=summary["num_skipped"],
    )
    _atomic_write_text(output / "meta.json", json.dumps(meta, indent=2))
    return summary


def _load_chunk(path: Path) -> np.ndarray:
    """A chunk's features, memory-mapped (read only when copied out), or loaded when it is empty."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:  # numpy cannot map a zero-length array
        return np.load(path, allow_pickle=False)


def _stream_npy(path: Path, arrays: Sequence[np.ndarray], rows: int, dim: int) -> None:
    """Write the concatenation of `arrays` as one float32 .npy, one chunk at a time (atomically): the merged
    matrix is never held in memory, so merging a million-image extraction costs one chunk of memory, not two
    copies of every feature."""
    from dino.io import atomic_write

    with atomic_write(path, needed_bytes=rows * dim * 4 + 128) as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": np.dtype(np.float32).str, "fortran_order": False, "shape": (rows, dim)}
        )
        for array in arrays:
            if len(array):
                handle.write(np.ascontiguousarray(array, dtype=np.float32).tobytes())


def merge_chunks(output: Path, num_chunks: int, settings: ExtractionSettings) -> dict:
    """Concatenate the chunk files into features.(npy|safetensors), paths.txt and skipped.txt.

    The chunks are memory-mapped and the .npy is written chunk by chunk (`_stream_npy`); safetensors needs the
    whole matrix at once."""
    chunks_dir = output / "chunks"
    arrays, paths, skipped = [], [], []
    for index in range(num_chunks):
        npy, txt, bad = _chunk_files(chunks_dir, index)
        arrays.append(_load_chunk(npy))
        paths.extend(read_path_list(txt))
        skipped.extend(read_path_list(bad) if bad.exists() else [])
    dims = {a.shape[1] for a in arrays if len(a)}
    if len(dims) > 1:
        raise UserError(
            f"chunks in {chunks_dir} have different feature sizes {sorted(dims)}; they come from different "
            "settings — delete the folder and extract again"
        )
    dim = dims.pop() if dims else 0
    rows = sum(len(a) for a in arrays) if dim else 0
    if settings.output_format == "safetensors":
        from safetensors.numpy import save_file

        features = np.concatenate([a for a in arrays if len(a)]) if dim else np.zeros((0, 0), np.float32)
        save_file({"features": np.ascontiguousarray(features, dtype=np.float32)}, str(output / "features.safetensors"))
        del features
    else:
        _stream_npy(output / "features.npy", arrays, rows, dim)
    del arrays
    write_path_list(output / "paths.txt", paths)
    write_path_list(output / "skipped.txt", skipped)
    return dict(output_dir=str(output), num_features=int(rows), dim=int(dim), num_skipped=len(skipped), skipped=skipped)


def load_extracted(folder: str | os.PathLike) -> tuple[np.ndarray, list[str], dict]:
    """(features (N, D) float32, paths, meta) of an extraction folder.

    Every file is checked: a features file that needs pickle (an object array) or is not an array at all, a
    missing paths.txt or an unreadable meta.json is a one-line UserError naming the file.
    """
    folder = Path(require_path(folder, "features folder", must_be_dir=True))
    if (folder / "features.npy").exists():
        source = folder / "features.npy"
        try:  # never pickle: a features file is numbers, and unpickling runs code
            features = np.load(source, allow_pickle=False)
        except Exception as err:
            raise UserError(
                f"cannot read {source}: not a plain numeric .npy array "
                f"({(str(err).splitlines() or [type(err).__name__])[0]}); run `dino extract` again"
            ) from None
    elif (folder / "features.safetensors").exists():
        from safetensors.numpy import load_file

        source = folder / "features.safetensors"
        try:
            features = load_file(str(source))["features"]
        except Exception as err:
            raise UserError(
                f"cannot read {source}: {(str(err).splitlines() or [type(err).__name__])[0]}; run `dino extract` again"
            ) from None
    else:
        raise UserError(f"{folder} holds no features.npy or features.safetensors; run `dino extract` first")
    if not isinstance(features, np.ndarray) or features.ndim != 2 or features.dtype.kind not in "fiu":
        raise UserError(
            f"{source} is not a 2-D numeric feature matrix (got {getattr(features, 'dtype', type(features))} "
            f"of shape {getattr(features, 'shape', '?')}); run `dino extract` again"
        )
    paths_file = folder / "paths.txt"
    if not paths_file.is_file():
        raise UserError(f"{folder} has no paths.txt next to its features; run `dino extract` again")
    try:
        paths = read_path_list(paths_file)
    except UnicodeDecodeError as err:
        raise UserError(f"{paths_file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    meta: dict = {}
    if (folder / "meta.json").exists():
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read {folder / 'meta.json'}: {err}") from None
        if not isinstance(meta, dict):
            raise UserError(f"{folder / 'meta.json'} does not hold a JSON object")
    if len(paths) != len(features):
        raise UserError(f"{folder}: {len(features)} feature rows but {len(paths)} paths")
    return features.astype(np.float32, copy=False), paths, meta
