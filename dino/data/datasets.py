"""Image datasets: labelled class folders, unlabelled folders and file lists, and robust image loading.

`build_dataset(path)` is what training scripts call with `--data_path`: it accepts

- a `.txt` file list (one image path per line),
- a folder laid out as `root/<class>/<image>` (every image exactly one folder below the root),
- any other folder of images, flat or nested (labels are then -1).

Bad input (missing path, no images) raises a `UserError` when the dataset is built, before any DataLoader
worker starts.  A file that cannot be decoded during training is skipped instead of crashing a run that may
have been going for hours: `__getitem__` moves on to the next readable image, warns once per bad file and
counts it in `num_skipped`.
"""

from __future__ import annotations

import os
import stat
import warnings
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from dino.data.transforms import load_image_for, min_decode_side
from dino.errors import UserError, require_path

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)

# Label given to images of unlabelled datasets.
NO_LABEL = -1

# How many entries of a file list are checked for existence at construction: enough to catch a list whose
# relative paths resolve against the wrong folder, cheap enough for lists of millions of lines.
_FILE_LIST_CHECK = 16

Transform = Callable[[Image.Image], object]


class CorruptImageError(UserError):
    """An image file that exists but cannot be decoded (or cannot be opened at all)."""


class SkippedImageWarning(UserWarning):
    """Issued once per unreadable image that a dataset skipped."""


def is_image_file(path: str) -> bool:
    """True when `path` has one of the supported image extensions (case-insensitive)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------------------------- loading


def _integer_to_uint8(array: np.ndarray, max_value: float) -> np.ndarray:
    """Scale integers in [0, max_value] linearly to [0, 255] (rounding), so 16-bit images keep their contrast."""
    scaled = np.clip(array.astype(np.float64), 0, max_value) * (255.0 / max_value)
    return np.round(scaled).astype(np.uint8)


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Convert single-channel 16/32-bit integer or float images to 8-bit 'L'.

    Pillow's own `convert("L")` clips such values to 255 instead of scaling them, which turns most 16-bit
    images white.  Integer modes are read as 16-bit data (0..65535, what 16-bit PNG/TIFF decode to); float
    images are taken as [0, 1] when they fit in it and as [0, 255] otherwise.
    """
    array = np.asarray(image)
    if image.mode == "F":
        finite = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        max_value = 1.0 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 255.0
        return Image.fromarray(_integer_to_uint8(finite, max_value), mode="L")
    return Image.fromarray(_integer_to_uint8(array, 65535.0), mode="L")


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten an image with transparency onto a white background (transparent pixels become white, not black)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image mode to 8-bit RGB with correct values.

    Grayscale is replicated over three channels, palette images are expanded, images with an alpha channel or
    a transparent palette entry are composited on white, and 16-bit / 32-bit images are rescaled to 0..255.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _high_bit_depth_to_l(image).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        return _composite_on_white(image)
    return image.convert("RGB")


def open_regular_file(path: str | os.PathLike):
    """Open `path` for reading only if it is a regular file, as a binary file object.

    Opened non-blocking and checked on the open descriptor (no race with a swapped name): a FIFO named
    `x.jpg` would otherwise block `open()` forever, and a device would stream without end.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file: {os.fspath(path)}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image, upright according to its EXIF orientation.

    Raises `CorruptImageError` (a `UserError`) naming the file when it cannot be opened or decoded, or when
    it is not a regular file (a FIFO or a device named like an image).
    """
    path = os.fspath(path)
    try:
        with open_regular_file(path) as handle, Image.open(handle) as opened:
            opened.load()  # decode now: truncated files fail here, inside the try
            image = opened
            try:
                image = ImageOps.exif_transpose(opened)
            except Exception:  # a malformed EXIF block must not cost us an otherwise good image
                image = opened
            rgb = to_rgb(image)
            # The opened image dies with the `with` block (closing the file, so long-lived workers leak no
            # descriptors); keep an independent copy when no conversion has made one already.
            return rgb.copy() if rgb is opened else rgb
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"cannot read image {path}: {err}") from err


# --------------------------------------------------------------------------------------------- discovery


class ImageListing(list):
    """The sorted image paths of a folder (a plain list), plus `skipped`: `(path, reason)` for every entry
    that looked like an image or a folder of images but could not be used."""

    def __init__(self, paths=(), skipped=()):
        super().__init__(paths)
        self.skipped: list[tuple[str, str]] = list(skipped)


def list_images(
    root: str | os.PathLike, warn: bool = True, recursive: bool = True, extensions: tuple[str, ...] | None = None
) -> ImageListing:
    """All image files below `root`, as sorted absolute paths: the one lister for training, extraction and eval.

    - regular files only: a FIFO, socket or device named like an image is skipped (opening a FIFO blocks);
    - symlinks are followed, but every folder and every file is visited once (by device and inode), so a
      symlink loop or two links to one folder do not list its images again and again;
    - hidden entries (`.name`) are ignored; `recursive=False` lists `root` alone (flat dataset layouts),
      `extensions` narrows the accepted suffixes (e.g. `(".jpg", ".jpeg")`);
    - a sub-folder that cannot be read, a broken link or a non-regular "image" is recorded in `.skipped`
      and reported in one `SkippedImageWarning` (unless `warn=False`), never dropped silently.
    """
    root = os.path.abspath(os.fspath(root))
    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    seen_folders: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    try:
        root_stat = os.stat(root)
    except OSError as err:
        raise UserError(f"cannot read {root}: {err.strerror or err}") from None
    seen_folders.add((root_stat.st_dev, root_stat.st_ino))
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as entries:
                entries = sorted(entries, key=lambda e: e.name)
        except OSError as err:
            skipped.append((folder, f"unreadable folder ({err.strerror or err})"))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                info = entry.stat()  # follows symlinks
            except OSError as err:
                if is_image_file(entry.name) or entry.is_symlink():
                    skipped.append((entry.path, f"cannot stat ({err.strerror or err})"))
                continue
            key = (info.st_dev, info.st_ino)
            if stat.S_ISDIR(info.st_mode):
                if recursive and key not in seen_folders:  # a symlink loop or a second link to a folder already listed
                    seen_folders.add(key)
                    subfolders.append(entry.path)
            elif entry.name.lower().endswith(extensions) if extensions else is_image_file(entry.name):
                if not stat.S_ISREG(info.st_mode):
                    skipped.append((entry.path, "not a regular file"))
                elif key not in seen_files:
                    seen_files.add(key)
                    found.append(entry.path)
        pending.extend(reversed(subfolders))
    listing = ImageListing(sorted(found), skipped)
    if skipped and warn:
        shown = "; ".join(f"{path}: {why}" for path, why in skipped[:3])
        more = f" (+{len(skipped) - 3} more)" if len(skipped) > 3 else ""
        warnings.warn(
            f"skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} under {root}: {shown}{more}",
            SkippedImageWarning,
            stacklevel=2,
        )
    return listing


def read_file_list(list_path: str) -> list[str]:
    """Paths listed in a text file: one per line, blank lines and `#` comments ignored.

    Relative paths are resolved against the folder that holds the list, so a list can travel with its data.
    """
    base = os.path.dirname(os.path.abspath(list_path))
    paths = []
    with open(list_path, encoding="utf-8") as handle:
        for line in handle:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            entry = os.path.expanduser(entry)
            paths.append(entry if os.path.isabs(entry) else os.path.normpath(os.path.join(base, entry)))
    return paths


def _relative_depth(path: str, root: str) -> int:
    """Number of folders between `root` and the file `path` (0 for a file directly in root)."""
    return len(os.path.relpath(path, root).split(os.sep)) - 1


def _class_folders(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


# -------------------------------------------------------------------------------------------- datasets


class ImageListDataset(torch.utils.data.Dataset):
    """A dataset over a fixed list of (image path, label) pairs that skips unreadable images.

    `dataset[i]` returns `(transform(image), label)`.  When image `i` cannot be read, the following images
    are tried in turn (wrapping around); the bad file is reported once with a `SkippedImageWarning` and
    counted in `num_skipped`.  The record of bad files lives in shared memory, so skips that happen inside
    DataLoader worker processes are visible in the main process too.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Transform | None = None):
        if len(samples) == 0:
            raise UserError("dataset has no images")
        self.samples: list[tuple[str, int]] = list(samples)
        self.targets: list[int] = [label for _, label in self.samples]
        self.transform = transform
        # One flag per sample; each write touches only its own byte, so workers never race on a counter.
        self._unreadable = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_skipped(self) -> int:
        """How many distinct image files were found unreadable and skipped so far."""
        return int(self._unreadable.sum())

    @property
    def skipped_paths(self) -> list[str]:
        return [self.samples[i][0] for i in torch.nonzero(self._unreadable).flatten().tolist()]

    def _mark_unreadable(self, index: int, error: Exception) -> None:
        if not bool(self._unreadable[index]):
            self._unreadable[index] = True
            warnings.warn(f"skipping unreadable image ({error})", SkippedImageWarning, stacklevel=3)

    def __getitem__(self, index: int):
        size = len(self.samples)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for a dataset of {size} images")
        index %= size
        for offset in range(size):
            candidate = (index + offset) % size
            if bool(self._unreadable[candidate]):
                continue
            path, label = self.samples[candidate]
            try:
                # decoded only as large as the transform needs (a 144-megapixel photo is not carried in full)
                image = load_image_for(path, min_decode_side(self.transform) if self.transform is not None else None)
            except CorruptImageError as err:
                self._mark_unreadable(candidate, err)
                continue
            return (self.transform(image) if self.transform is not None else image), label
        raise UserError(f"none of the {size} images of this dataset could be read")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_images={len(self)}, transform={self.transform!r})"


class ImageFolderDataset(ImageListDataset):
    """Labelled images laid out as `root/<class>/.../<image>`; labels are indices of sorted class names.

    `class_to_idx` fixes the mapping (e.g. pass the training set's mapping when building the validation set);
    a class folder missing from it is an error.  Class folders without images are kept (so indices stay
    stable) but produce a warning.  `image_paths` may pass an already-made listing of the images under
    `root` to skip walking the folder again.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform | None = None,
        class_to_idx: dict[str, int] | None = None,
        *,
        image_paths: Iterable[str] | None = None,
    ):
        self.root = os.path.abspath(require_path(root, "image folder", must_be_dir=True))
        folders = _class_folders(self.root)
        if class_to_idx is None:
            class_to_idx = {name: i for i, name in enumerate(folders)}
        else:
            unknown = [name for name in folders if name not in class_to_idx]
            if unknown:
                raise UserError(f"class folders of {self.root} not in the given class mapping: {unknown[:10]}")
        self.class_to_idx: dict[str, int] = dict(class_to_idx)
        self.classes: list[str] = sorted(self.class_to_idx, key=self.class_to_idx.__getitem__)

        paths = list_images(self.root) if image_paths is None else sorted(os.path.abspath(p) for p in image_paths)
        samples, per_class = [], {name: 0 for name in self.classes}
        for path in paths:
            parts = os.path.relpath(path, self.root).split(os.sep)
            if len(parts) < 2 or parts[0] not in self.class_to_idx:
                continue  # a file directly in root (or outside it) belongs to no class
            samples.append((path, self.class_to_idx[parts[0]]))
            per_class[parts[0]] += 1
        if not samples:
            raise UserError(
                f"no images found in the class folders of {self.root} (extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        empty = [name for name in folders if per_class.get(name, 0) == 0]
        if empty:
            warnings.warn(f"{len(empty)} class folder(s) of {self.root} hold no images: {empty[:10]}", stacklevel=2)
        super().__init__(samples, transform)


class UnlabeledImageDataset(ImageListDataset):
    """Images without labels (label -1): every image below a folder (flat or nested), or a `.txt` file list.

    File-list entries are not all checked up front (lists can hold millions of lines); entries that turn out
    to be missing or unreadable are skipped during iteration like corrupt files.
    """

    def __init__(
        self,
        root_or_filelist: str | os.PathLike,
        transform: Transform | None = None,
        *,
        image_paths: Iterable[str] | None = None,
    ):
        source = require_path(root_or_filelist, "dataset path")
        self.root = os.path.abspath(source)
        if os.path.isdir(source):
            paths = list_images(self.root) if image_paths is None else sorted(os.path.abspath(p) for p in image_paths)
            if not paths:
                raise UserError(f"no images found under {self.root} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        else:
            paths = read_file_list(source)
            if not paths:
                raise UserError(f"file list {self.root} names no images")
            head = paths[:_FILE_LIST_CHECK]
            if not any(os.path.isfile(p) for p in head):
                raise UserError(
                    f"none of the first {len(head)} files in {self.root} exist (first: {head[0]}); "
                    "relative entries are resolved against the list's own folder"
                )
        super().__init__([(p, NO_LABEL) for p in paths], transform)


def build_dataset(path: str | os.PathLike, transform: Transform | None = None) -> ImageListDataset:
    """Pick the dataset kind from what `path` is.

    - a `.txt` file → `UnlabeledImageDataset` over the listed files;
    - a folder whose images all sit directly in immediate subfolders (`root/<class>/<image>`) →
      `ImageFolderDataset` (labels = subfolder);
    - any other folder (images in the root, or nested deeper) → `UnlabeledImageDataset`.

    Raises `UserError` for a missing path, a non-`.txt` file, or a folder without images.
    """
    source = require_path(path, "dataset path")
    if os.path.isfile(source):
        if source.lower().endswith(".txt"):
            return UnlabeledImageDataset(source, transform)
        raise UserError(f"dataset path must be a folder of images or a .txt file list, got the file {source}")
    root = os.path.abspath(source)
    paths = list_images(root)
    if not paths:
        raise UserError(f"no images found under {root} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    if all(_relative_depth(p, root) == 1 for p in paths):
        return ImageFolderDataset(root, transform, image_paths=paths)
    return UnlabeledImageDataset(root, transform, image_paths=paths)
