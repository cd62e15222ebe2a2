"""Weighted k-NN evaluation of a frozen backbone (DINO v1 / DINOv2 protocol).

    dino eval-knn --pretrained_weights output/checkpoint.pth                 # the demo dataset
    dino eval-knn --pretrained_weights ckpt.pth --data_path /data/imagenet  # train/ and val/
    torchrun --nproc_per_node 8 -m dino eval-knn --pretrained_weights ckpt.pth --data_path /data/imagenet

All defaults live in dino/configs/eval/knn.yaml; the work is done by `dino.eval.knn.run_knn`.
"""

from __future__ import annotations

from typing import Sequence

from dino.config import ConfigCLI, Flag
from dino.eval.cli_flags import backbone_flags, device_flags, feature_cache_flags, image_flags

CLI = ConfigCLI(
    description="Weighted k-NN classification of frozen [CLS] features (DINO v1 / DINOv2 protocol).",
    group="eval",
    default_config="knn",
    flags=backbone_flags()
    + image_flags()
    + [
        Flag(("--nb_knn",), "knn.nb_knn", "numbers of neighbours", type=int, nargs="+", metavar="K"),
        Flag(
            ("--temperature",),
            "knn.temperature",
            "temperature T of the exp(cos/T) vote weights",
            type=float,
            metavar="T",
        ),
    ]
    + device_flags()
    + feature_cache_flags()
    + [
        Flag(("--output_dir",), "output_dir", "where knn_results.json is written", metavar="DIR"),
    ],
    epilog=__doc__.split("\n\n")[1],
)


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, _ = CLI.parse(argv)
    from dino.eval.knn import run_knn

    return run_knn(cfg)
