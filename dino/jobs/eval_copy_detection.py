"""Copy detection on Copydays "strong": mAP with DINO v1's features ([CLS] + GeM-pooled patch tokens) and
PCA-whitening learned on a separate image set.

Example:
    dino eval-copy-detection --data_path /data/copydays --whitening_path /data/yfcc_20k \\
        --distractors_path /data/yfcc_10k --pretrained_weights dino_vitb8 --imsize 320
"""

from __future__ import annotations

from dino.config import ConfigCLI, Flag, bool_flag
from dino.eval.cli_flags import backbone_flags, device_flags

FLAGS = (
    backbone_flags()
    + device_flags(use_cuda_alias=False)
    + [
        Flag(("--data_path",), "data_path", "Copydays folder holding original/ and strong/"),
        Flag(("--distractors_path",), "distractors_path", "folder of distractor images added to the database"),
        Flag(("--whitening_path",), "whitening_path", "folder of images on which the PCA-whitening is learned"),
        Flag(
            ("--whiten_on_database",),
            "whiten_on_database",
            "without --whitening_path, learn the whitening on the database",
            type=bool_flag,
        ),
        Flag(("--imsize",), "imsize", "square input size", type=int),
        Flag(("--top",), "top", "number of ranked database images scored per query", type=int),
        Flag(("--ranking",), "ranking", "ranking backend", choices=("auto", "torch", "faiss")),
        Flag(("--batch_size_per_gpu", "--batch_size"), "batch_size", "images per forward pass", type=int),
        Flag(("--output_dir",), "output_dir", "where copy_detection.json is written"),
        Flag(("--num_workers",), "num_workers", "data-loading workers", type=int),
    ]
)


def main(argv=None) -> dict:
    cli = ConfigCLI(__doc__.splitlines()[0], group="eval", default_config="copy_detection", flags=FLAGS, epilog=__doc__)
    cfg, _ = cli.parse(argv)
    from dino.eval.copy_detection import run_copy_detection

    return run_copy_detection(cfg)
