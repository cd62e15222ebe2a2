"""Overlay a DINO / DINOv2 backbone's [CLS] attention on every frame of a video or a folder of frames.

Each frame is resized to a multiple of the patch size; the overlay is the mean attention over heads, or
with --threshold the share of heads whose mask (keeping that fraction of attention mass) covers a patch.
The result is written as a video when --output_path ends in .mp4/.mkv/.mov/.avi/.webm (needs PyAV:
pip install 'dino[video]'), otherwise as a folder of PNG frames.
"""

from __future__ import annotations

from typing import Sequence

from dino.config import ConfigCLI, Flag
from dino.distributed import DeviceContext
from dino.errors import UserError
from dino.eval.video import default_output_path, import_av, is_video_path, open_frames, render_attention_video
from dino.eval.visualization import (
    backbone_flags,
    check_keep_fraction,
    load_backbone_for_visualization,
    parse_image_size,
)
from dino.log import get_logger

logger = get_logger(__name__)

CLI = ConfigCLI(
    description=__doc__,
    group="eval",
    default_config="video_generation",
    flags=[
        Flag(names=("--input_path",), key="input_path", help="video file (needs PyAV) or folder of image frames"),
        Flag(
            names=("--output_path",),
            key="output_path",
            help="video file (.mp4, .mkv, .mov, .avi, .webm) or folder for PNG frames; empty: under output/",
        ),
        *backbone_flags(),
        Flag(names=("--fps",), key="fps", type=float, help="output frame rate; empty: the input's (30 for frames)"),
        Flag(
            names=("--resize",),
            key="resize",
            type=int,
            nargs="+",
            metavar="SIZE",
            help="one int: shorter side; two: height width; empty: keep (all rounded to patch multiples)",
        ),
        Flag(
            names=("--threshold",),
            key="threshold",
            type=float,
            help="show the share of heads keeping this fraction of attention mass instead of the mean attention",
        ),
        Flag(names=("--batch_size",), key="batch_size", type=int, help="frames per forward pass"),
    ],
    epilog="examples:\n"
    "  dino video --input_path clip.mp4 --output_path clip-attention.mp4 --resize 480\n"
    "  dino video --input_path frames/ --output_path overlays/ --pretrained_weights ckpt.pth",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the number of frames written."""
    cfg, _ = CLI.parse(argv)
    if not cfg.input_path:
        raise UserError("--input_path is required: a video file or a folder of image frames")
    keep_fraction = check_keep_fraction(cfg.threshold)
    resize = parse_image_size(cfg.resize, "--resize")
    if cfg.fps is not None and cfg.fps <= 0:
        raise UserError(f"--fps must be positive, got {cfg.fps}")
    if int(cfg.batch_size) < 1:
        raise UserError(f"--batch_size must be at least 1, got {cfg.batch_size}")
    source = open_frames(cfg.input_path)
    output_path = cfg.output_path or default_output_path(cfg.input_path, source)
    if is_video_path(output_path):
        import_av()  # fail before loading the model when PyAV is missing
    device = DeviceContext.create(cfg.device).device
    model = load_backbone_for_visualization(cfg, device)
    count = render_attention_video(
        model,
        source,
        output_path,
        device,
        fps=cfg.fps,
        resize=resize,
        keep_fraction=keep_fraction,
        batch_size=int(cfg.batch_size),
    )
    logger.info(f"wrote {count} frames to {output_path}")
    return count
