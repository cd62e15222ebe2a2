"""Command-line flags shared by the evaluation scripts.

They set the config keys the eval code reads (`model.*` for the backbone, `data.*` for images, `device`,
`precision`, feature dumps), so every script spells them alike: the DINO v1 names, with the DINO v1 aliases.
"""

from __future__ import annotations

import argparse
import warnings

from dino.config import Flag, bool_flag, precision_flags
from dino.distributed import DEVICE_CHOICES


def use_cuda_device(value: str) -> str:
    """DINO v1's `--use_cuda true|false`, kept as a deprecated alias of `--device cuda|cpu`."""
    try:
        use_cuda = bool_flag(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--use_cuda expects true or false, got {value!r}") from None
    warnings.warn("--use_cuda is deprecated; use --device cuda|cpu", FutureWarning, stacklevel=2)
    return "cuda" if use_cuda else "cpu"


def backbone_flags(role: str = "checkpoint to evaluate") -> list[Flag]:
    """--pretrained_weights --arch --patch_size --checkpoint_key --allow_pickle (keys `model.*`); `role` opens
    --pretrained_weights' help (evaluation, extraction, export all load the backbone the same way)."""
    return [
        Flag(
            ("--pretrained_weights",),
            "model.pretrained_weights",
            f"{role} (ours or official), URL or hub name",
            metavar="PATH",
        ),
        Flag(("--arch",), "model.arch", "ViT size; read from the checkpoint when not given", metavar="ARCH"),
        Flag(
            ("--patch_size",),
            "model.patch_size",
            "patch size; read from the checkpoint when not given",
            type=int,
            metavar="N",
        ),
        Flag(
            ("--checkpoint_key",),
            "model.checkpoint_key",
            "network of a training checkpoint",
            choices=("teacher", "student"),
        ),
        Flag(
            ("--allow_pickle",),
            "model.allow_pickle",
            "load checkpoints that need pickle (trusted files only)",
            type=bool_flag,
        ),
    ]


def image_flags() -> list[Flag]:
    """--data_path --batch_size_per_device (--batch_size_per_gpu) --num_workers --resize_size --crop_size (keys `data.*`)."""
    return [
        Flag(
            ("--data_path",),
            "data.data_path",
            "ImageFolder root with train/ and val/ (empty: demo dataset)",
            metavar="PATH",
        ),
        Flag(
            ("--batch_size_per_device", "--batch_size_per_gpu"),
            "data.batch_size_per_device",
            "images per batch per device",
            type=int,
            metavar="N",
        ),
        Flag(("--num_workers",), "data.num_workers", "data loading processes per device", type=int, metavar="N"),
        Flag(("--resize_size",), "data.resize_size", "shorter side before the centre crop", type=int, metavar="PX"),
        Flag(
            ("--crop_size",),
            "data.crop_size",
            "centre (eval) and random-resized (linear training) crop size",
            type=int,
            metavar="PX",
        ),
    ]


def device_flags(use_cuda_alias: bool = True) -> list[Flag]:
    """--device, the deprecated --use_cuda (optional), --precision (and its aliases --hmp, --fp16)."""
    flags = [
        Flag(("--device",), "device", "where to run", choices=DEVICE_CHOICES),
        Flag(
            ("--use_cuda",),
            "device",
            "deprecated: --use_cuda true|false means --device cuda|cpu",
            type=use_cuda_device,
            extra=dict(nargs="?", const="true", metavar="BOOL"),
        ),
        *precision_flags("precision"),  # --precision fp32|bf16|fp16, --hmp / --use_bf16, --fp16 / --use_fp16
    ]
    return flags if use_cuda_alias else [f for f in flags if "--use_cuda" not in f.names]


def feature_cache_flags() -> list[Flag]:
    """--dump_features --load_features."""
    return [
        Flag(("--dump_features",), "dump_features", "save the extracted features to this folder", metavar="DIR"),
        Flag(
            ("--load_features",),
            "load_features",
            "use features saved by --dump_features instead of a backbone",
            metavar="DIR",
        ),
    ]
