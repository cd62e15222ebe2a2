"""The `dino` command: every job of the package, one subcommand each.

    dino train --config dinov2_vits14 --data_path /data/images --output_dir runs/vits14
    dino eval-knn --pretrained_weights runs/vits14/teacher_backbone.safetensors --data_path /data/imagenet
    dino visualize-attention --image_path cat.jpg --pretrained_weights dinov2_vits14
    dino extract --pretrained_weights ckpt.pth --source /data/images --output_dir feats
    dino search --features_dir feats --queries query.jpg --k 10

`python -m dino ...` is the same command; `dino <command> --help` lists its flags (the top-level scripts
main_dino.py, eval_*.py, visualize_*.py and video_generation.py take the same ones). Every default lives in
dino/configs/<group>/<preset>.yaml.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from typing import Any, Iterator, Sequence

from dino.config import ConfigCLI, Flag, bool_flag
from dino.distributed.device import DEVICE_CHOICES
from dino.errors import UserError, run_cli, suggest
from dino.eval.cli_flags import backbone_flags

# the backbone flags every job shares (one list: dino.eval.cli_flags)
_MODEL_FLAGS = backbone_flags("checkpoint")

EXTRACT = ConfigCLI(
    description="Extract one feature row per image ([CLS] and/or mean patch token) into a resumable features folder.",
    group="inference",
    default_config="extract",
    flags=_MODEL_FLAGS
    + [
        Flag(
            ("--source", "--data_path"), "data.source", "folder of images (recursive) or .txt file list", metavar="PATH"
        ),
        Flag(("--output_dir",), "output_dir", "features folder (rerun with the same folder to resume)", metavar="DIR"),
        Flag(("--features",), "features", "what each row holds", choices=("cls", "patch_mean", "cls_patch_mean")),
        Flag(("--normalize",), "normalize", "L2-normalise each row", type=bool_flag),
        Flag(("--output_format",), "output_format", "merged feature file format", choices=("npy", "safetensors")),
        Flag(("--batch_size",), "data.batch_size", "images per batch", type=int, metavar="N"),
        Flag(("--num_workers",), "data.num_workers", "image loading processes", type=int, metavar="N"),
        Flag(
            ("--crop_size",), "data.crop_size", "centre crop size (multiple of the patch size)", type=int, metavar="PX"
        ),
        Flag(("--resize_size",), "data.resize_size", "shorter side before the crop", type=int, metavar="PX"),
        Flag(("--chunk_size",), "chunk_size", "images per resumable chunk", type=int, metavar="N"),
        Flag(("--device",), "device", "where to run", choices=DEVICE_CHOICES),
        Flag(
            ("--precision",),
            "precision",
            "fp32, bf16 weights, int8 with dynamic activation ranges (CPU), or "
            "int8_static with ranges calibrated on the first images (CPU; fastest, features independent of the batch)",
            choices=("fp32", "bf16", "int8", "int8_static"),
        ),
        Flag(
            ("--calibration_images",),
            "calibration_images",
            "int8_static: images that fix the activation ranges",
            type=int,
            metavar="N",
        ),
        Flag(("--compile",), "compile", "torch.compile the backbone", type=bool_flag),
        Flag(("--progress",), "progress", "show a progress bar", type=bool_flag),
    ],
    epilog="example: dino extract --pretrained_weights ckpt.pth --source /data/images --output_dir feats",
)

SEARCH = ConfigCLI(
    description="Top-k nearest neighbours of query images in a features folder, with an HTML/PNG contact sheet.",
    group="inference",
    default_config="search",
    flags=[
        Flag(("--features_dir",), "features_dir", "folder written by `dino extract`", metavar="DIR"),
        Flag(("--queries",), "queries", "query images, folders or .txt lists", nargs="+", metavar="PATH"),
        Flag(("--k",), "k", "neighbours per query", type=int, metavar="K"),
        Flag(("--index",), "index", "index kind", choices=("auto", "exact", "ivfpq", "torch")),
        Flag(("--output_dir",), "output_dir", "where results.json and the contact sheet go", metavar="DIR"),
        Flag(("--contact_sheet",), "contact_sheet", "contact sheet format", choices=("html", "png", "both", "none")),
        Flag(("--device",), "device", "where new query images are embedded", choices=DEVICE_CHOICES),
    ],
    epilog="example: dino search --features_dir feats --queries photo.jpg --k 10",
)

DUPLICATES = ConfigCLI(
    description="List near-duplicate image pairs (similarity ≥ threshold) of a features folder, most similar first.",
    group="inference",
    default_config="duplicates",
    flags=[
        Flag(("--features_dir",), "features_dir", "folder written by `dino extract`", metavar="DIR"),
        Flag(("--threshold",), "threshold", "minimum cosine similarity of a listed pair", type=float, metavar="T"),
        Flag(("--output",), "output", "CSV file (similarity,first,second)", metavar="FILE"),
    ],
    epilog="example: dino duplicates --features_dir feats --threshold 0.95",
)

EXPORT = ConfigCLI(
    description="Export a backbone to ONNX, GGUF (dinov2.cpp / ggml) or a Hugging Face Dinov2Model folder, and verify it.",
    group="inference",
    default_config="export",
    flags=_MODEL_FLAGS
    + [
        Flag(("--format",), "format", "output format", choices=("onnx", "gguf", "hf")),
        Flag(("--output",), "output", "output file (onnx, gguf) or folder (hf)", metavar="PATH"),
        Flag(("--verify",), "verify", "compare the export with PyTorch", type=bool_flag),
        Flag(
            ("--image_size",),
            "image_size",
            "ONNX: example size for the export, a multiple of the patch size (batch, height and "
            "width stay dynamic; other sizes are cropped to multiples of the patch; verified at this size, the stored "
            "grid's, a larger, a non-square and a cropped one). HF (v1/v2): the size the position embedding is baked "
            "for — exact there, transformers resizes it its own way at other sizes (verified at both)",
            type=int,
            metavar="PX",
        ),
        Flag(("--ftype",), "gguf.ftype", "GGUF: tensor type of the matrices", choices=("f32", "f16")),
        Flag(("--overwrite",), "overwrite", "replace an existing --output (refused otherwise)", type=bool_flag),
    ],
    epilog="example: dino export --pretrained_weights ckpt.pth --format gguf --output dinov2.gguf",
)


# subcommand → its flags and the `dino.inference.commands` function that runs it (imported on use: `--help`
# and bad flags answer without loading torch-heavy modules); the result is printed as JSON
COMMANDS: dict[str, tuple[str, ConfigCLI]] = {
    "extract": ("run_extract", EXTRACT),
    "search": ("run_search", SEARCH),
    "duplicates": ("run_duplicates", DUPLICATES),
    "export": ("run_export", EXPORT),
}

# subcommand → ("module" holding `main(argv)`, or "module:function", one-line description); the module is
# imported only when its command runs, and each prints its own report (tables, paths written) as the matching top-level script does
JOBS: dict[str, tuple[str, str]] = {
    "train": ("dino.train.cli", "Self-supervised training of a ViT with DINO / DINOv2 (= main_dino.py)."),
    "eval-knn": ("dino.jobs.eval_knn", "Weighted k-NN classification of frozen [CLS] features (= eval_knn.py)."),
    "eval-linear": (
        "dino.jobs.eval_linear",
        "Linear probes or logistic regression on a frozen backbone (= eval_linear.py).",
    ),
    "eval-retrieval": (
        "dino.jobs.eval_retrieval",
        "Image retrieval on revisited Oxford / Paris (= eval_image_retrieval.py).",
    ),
    "eval-copy-detection": (
        "dino.jobs.eval_copy_detection",
        "Copy detection on Copydays strong (= eval_copy_detection.py).",
    ),
    "eval-davis": (
        "dino.jobs.eval_davis",
        "DAVIS-2017 video segmentation by label propagation (= eval_video_segmentation.py).",
    ),
    "eval-segmentation": (
        "dino.jobs.eval_segmentation",
        "Linear semantic segmentation probe, DINOv2 lin. / +ms (= eval_semantic_segmentation.py).",
    ),
    "eval-depth": ("dino.jobs.eval_depth", "Linear monocular depth probe, DINOv2 lin. 1 / lin. 4 (= eval_depth.py)."),
    "visualize-attention": (
        "dino.jobs.visualize_attention",
        "Last-block [CLS] attention maps as pictures (= visualize_attention.py).",
    ),
    "visualize-pca": ("dino.jobs.visualize_pca", "Joint PCA pictures of patch features (= visualize_pca.py)."),
    "video": (
        "dino.jobs.video",
        "Attention overlay on every frame of a video or frame folder (= video_generation.py).",
    ),
    "slurm": (
        "dino.run.slurm:submit",
        "Submit `dino train` to SLURM with submitit, requeue on pre-emption (= run_with_submitit.py).",
    ),
}


def _run_command(command: str, argv: Sequence[str]) -> dict:
    runner_name, cli = COMMANDS[command]
    cfg, _ = cli.parse(argv)
    from dino.inference import commands

    return getattr(commands, runner_name)(cfg)


def _run_job(command: str, argv: Sequence[str]) -> Any:
    module_name, _, function = JOBS[command][0].partition(":")
    return getattr(importlib.import_module(module_name), function or "main")(list(argv))


@contextlib.contextmanager
def _program_name(name: str) -> Iterator[None]:
    """argparse names the program after sys.argv[0]: make `--help` and errors say `dino <command>`."""
    saved = sys.argv[0] if sys.argv else None
    if saved is None:
        sys.argv.append(name)
    else:
        sys.argv[0] = name
    try:
        yield
    finally:
        if saved is None:
            sys.argv.pop(0)
        else:
            sys.argv[0] = saved


def command_names() -> list[str]:
    return list(JOBS) + list(COMMANDS)


def usage() -> str:
    descriptions = {name: description for name, (_, description) in JOBS.items()}
    descriptions.update({name: cli.description for name, (_, cli) in COMMANDS.items()})
    width = max(len(name) for name in descriptions)
    lines = ["usage: dino <command> [options]   (dino <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {description}" for name, description in descriptions.items()]
    return "\n".join(lines) + "\n\n" + __doc__.split("\n\n")[1] + "\n"


def dispatch(argv: Sequence[str]) -> Any:
    """Run one subcommand; raises UserError for bad input (`main` turns it into one line and exit code 2).

    Returns what the job returns: a result dict for extract/search/duplicates/export (also printed as JSON),
    the job's own result otherwise (metrics dict, paths written, a `TrainResult`), None for help."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    command, rest = argv[0], argv[1:]
    if command not in JOBS and command not in COMMANDS:
        raise UserError(
            f"unknown command {command!r}."
            + suggest(command, command_names())
            + f" Commands: {', '.join(command_names())}"
        )
    with _program_name(f"dino {command}"):
        if command in JOBS:
            return _run_job(command, rest)
        result = _run_command(command, rest)
    if result is not None:
        printable = {k: v for k, v in result.items() if k != "skipped"}
        print(json.dumps(printable, indent=2, default=str))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (`dino`); `run_cli` installs the console log handler."""
    args = sys.argv[1:] if argv is None else list(argv)
    run_cli(lambda: dispatch(args))


if __name__ == "__main__":
    main()
