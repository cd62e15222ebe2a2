"""Reading and writing frames, and the per-frame attention overlay of `video_generation.py`.

Inputs: a folder of image frames (any format Pillow reads, in natural order: frame-2 before frame-10), a
single image, or a video file.  Outputs: a folder of PNG frames, or a video file when the output path ends
in a video extension.  Video files need PyAV, the optional `video` extra (`pip install 'dino[video]'`);
without it a video path is a UserError that says so, and folders of frames keep working.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import torch
from PIL import Image

from dino.data.datasets import is_image_file, load_image
from dino.errors import UserError, require_path
from dino.eval.visualization import (
    ImageSize,
    cls_attention_maps,
    head_mean_heatmaps,
    image_to_tensor,
    overlay,
    resize_to_patch_multiple,
)

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm")
# encoders to try per container, best first (PyAV wheels ship libx264; mpeg4 is the universal fallback)
_ENCODERS = {".webm": ("libvpx-vp9", "libvpx"), ".avi": ("mpeg4", "libx264")}
_DEFAULT_ENCODERS = ("libx264", "h264", "mpeg4")
DEFAULT_FPS = 30.0
_PYAV_HINT = "pip install 'dino[video]' (or pip install av), or use a folder of image frames instead"


def import_av():
    """The `av` module; a UserError explaining how to install it when it is missing."""
    try:
        import av
    except ImportError:
        raise UserError(f"reading or writing video files needs PyAV, which is not installed: {_PYAV_HINT}") from None
    return av


def is_video_path(path: str | os.PathLike) -> bool:
    """True when `path` ends in one of `VIDEO_EXTENSIONS` (case-insensitive)."""
    return os.fspath(path).lower().endswith(VIDEO_EXTENSIONS)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_frame_files(folder: str | os.PathLike) -> list[str]:
    """Image files directly inside `folder`, in natural order; a UserError when there are none."""
    folder = require_path(folder, "frame folder", must_be_dir=True)
    from dino.data.datasets import list_images

    paths = sorted(list_images(folder, recursive=False), key=lambda p: _natural_key(os.path.basename(p)))
    if not paths:
        raise UserError(f"no image frames in {folder} (looked for files ending in .jpg, .png, ...)")
    return paths


@dataclass
class FrameSource:
    """Frames to process: an iterator of PIL RGB images plus what is known about them up front."""

    frames: Iterable[Image.Image]
    num_frames: int | None  # None when a video container does not record it
    fps: float | None  # None for folders and single images
    name: str  # for default output names


def _video_frames(av, path: str) -> FrameSource:
    try:
        container = av.open(path)
    except (OSError, ValueError, av.error.FFmpegError) as err:
        raise UserError(f"cannot read video {path}: {err}") from None
    if not container.streams.video:
        container.close()
        raise UserError(f"{path} holds no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    num_frames = int(stream.frames) or None

    def frames() -> Iterator[Image.Image]:
        try:
            for frame in container.decode(stream):
                yield frame.to_image().convert("RGB")
        except av.error.FFmpegError as err:
            raise UserError(f"cannot decode video {path}: {err}") from None
        finally:
            container.close()

    return FrameSource(frames(), num_frames, float(rate) if rate else None, Path(path).stem)


def open_frames(input_path: str | os.PathLike) -> FrameSource:
    """Frames of a folder of images, a single image, or (with PyAV) a video file."""
    path = require_path(input_path, "input")
    if os.path.isdir(path):
        files = list_frame_files(path)
        return FrameSource((load_image(f) for f in files), len(files), None, Path(path).resolve().name)
    if is_image_file(path):
        return FrameSource(iter([load_image(path)]), 1, None, Path(path).stem)
    return _video_frames(import_av(), path)


class FrameFolderWriter:
    """Writes frames as `frame-000000.png`, `frame-000001.png`, … into a folder (created if needed)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(
                f"output path {self.folder} exists and is not a folder; choose a folder or a video file name"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.num_frames = 0

    def write(self, frame: Image.Image) -> None:
        frame.convert("RGB").save(self.folder / f"frame-{self.num_frames:06d}.png")
        self.num_frames += 1

    def close(self) -> None:
        pass

    def __enter__(self) -> "FrameFolderWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class VideoFileWriter:
    """Encodes frames into a video file with PyAV (yuv420p; frames are cropped to even sides, which it needs)."""

    def __init__(self, path: str | os.PathLike, fps: float):
        self.av = import_av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rate = Fraction(fps).limit_denominator(1001)
        if self.rate <= 0:
            raise UserError(f"--fps must be positive, got {fps}")
        self.codec = self._pick_encoder()
        try:
            self.container = self.av.open(str(self.path), mode="w")
        except (OSError, ValueError, self.av.error.FFmpegError) as err:
            raise UserError(f"cannot write video {self.path}: {err}") from None
        self.stream = None
        self.size: tuple[int, int] | None = None
        self.num_frames = 0

    def _pick_encoder(self) -> str:
        for name in _ENCODERS.get(self.path.suffix.lower(), _DEFAULT_ENCODERS):
            try:
                self.av.codec.Codec(name, "w")
                return name
            except Exception:  # PyAV raises its own UnknownCodecError; any failure means "not available"
                continue
        raise UserError(f"this PyAV build has no encoder for {self.path.suffix} files; try an .mp4 output or a folder")

    def write(self, frame: Image.Image) -> None:
        if self.stream is None:
            # even width and height: yuv420p subsamples chroma by two
            self.size = (frame.width - frame.width % 2, frame.height - frame.height % 2)
            self.stream = self.container.add_stream(self.codec, rate=self.rate)
            self.stream.width, self.stream.height = self.size
            self.stream.pix_fmt = "yuv420p"
        if frame.size != self.size:
            frame = (
                frame.crop((0, 0, *self.size))
                if frame.width >= self.size[0] and frame.height >= self.size[1]
                else frame.resize(self.size, Image.BILINEAR)
            )
        video_frame = self.av.VideoFrame.from_image(frame.convert("RGB"))
        for packet in self.stream.encode(video_frame):
            self.container.mux(packet)
        self.num_frames += 1

    def close(self) -> None:
        if self.stream is not None:
            for packet in self.stream.encode():  # flush the encoder's buffered frames
                self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> "VideoFileWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_frame_writer(output_path: str | os.PathLike, fps: float) -> FrameFolderWriter | VideoFileWriter:
    """A video writer when `output_path` ends in a video extension, a PNG-folder writer otherwise."""
    return VideoFileWriter(output_path, fps) if is_video_path(output_path) else FrameFolderWriter(output_path)


def default_output_path(input_path: str | os.PathLike, source: FrameSource, output_root: str = "output") -> str:
    """`output/<name>-attention.mp4` for a video input, `output/<name>-attention/` (PNG frames) otherwise."""
    suffix = ".mp4" if is_video_path(input_path) or source.fps is not None else ""
    return os.path.join(output_root, f"{source.name}-attention{suffix}")


def _batches_of_equal_size(frames: Iterable[Image.Image], batch_size: int) -> Iterator[list[Image.Image]]:
    """Consecutive frames in lists of at most `batch_size`, a new list whenever the frame size changes."""
    batch: list[Image.Image] = []
    for frame in frames:
        if batch and (len(batch) == batch_size or frame.size != batch[0].size):
            yield batch
            batch = []
        batch.append(frame)
    if batch:
        yield batch


@torch.no_grad()
def attention_overlays(
    model: torch.nn.Module,
    frames: Iterable[Image.Image],
    device: torch.device,
    resize: ImageSize = None,
    keep_fraction: float | None = None,
    batch_size: int = 8,
    alpha: float = 0.5,
    colormap: str = "jet",
) -> Iterator[Image.Image]:
    """Each frame, resized to a patch multiple, with its [CLS] attention overlaid.

    The overlay is the mean over heads (min-max scaled per frame) or, with `keep_fraction`, the share of
    heads whose thresholded mask covers each patch (see `head_mean_heatmaps`).
    """
    resized = (resize_to_patch_multiple(frame, model.patch_size, resize) for frame in frames)
    for batch in _batches_of_equal_size(resized, max(1, batch_size)):
        pixels = torch.stack([image_to_tensor(frame) for frame in batch]).to(device)
        heatmaps = head_mean_heatmaps(cls_attention_maps(model, pixels).cpu(), keep_fraction).numpy()
        for frame, heatmap in zip(batch, heatmaps):
            yield overlay(frame, heatmap, alpha=alpha, colormap=colormap)


def render_attention_video(
    model: torch.nn.Module,
    source: FrameSource,
    output_path: str | os.PathLike,
    device: torch.device,
    fps: float | None = None,
    resize: ImageSize = None,
    keep_fraction: float | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> int:
    """Write the attention overlay of every frame of `source` to `output_path`; returns the number of frames.

    fps: output frame rate for video files (default: the input's, else 30).  Shows a tqdm progress bar.
    """
    from tqdm import tqdm

    with open_frame_writer(output_path, fps or source.fps or DEFAULT_FPS) as writer:
        overlays = attention_overlays(model, source.frames, device, resize, keep_fraction, batch_size)
        for picture in tqdm(overlays, total=source.num_frames, unit="frame", desc="attention", disable=not progress):
            writer.write(picture)
        return writer.num_frames
