"""Linear evaluation of a frozen backbone: DINOv2's grid of linear probes, or L-BFGS logistic regression.

    dino eval-linear --pretrained_weights output/checkpoint.pth --epochs 2      # demo dataset, full grid
    dino eval-linear --pretrained_weights ckpt.pth --data_path /data/imagenet --n_last_blocks 4 --lr 0.001 --epochs 100
    dino eval-linear --pretrained_weights ckpt.pth --protocol logreg              # = --config logreg
    torchrun --nproc_per_node 8 -m dino eval-linear --pretrained_weights ckpt.pth --data_path /data/imagenet

All defaults live in dino/configs/eval/linear.yaml (and logreg.yaml); the work is done by
`dino.eval.linear.run_linear` and `dino.eval.logreg.run_logreg`.
"""

from __future__ import annotations

from typing import Sequence

from dino.config import ConfigCLI, Flag, bool_flag
from dino.eval.cli_flags import backbone_flags, device_flags, feature_cache_flags, image_flags

CLI = ConfigCLI(
    description="Linear probes (DINOv2 grid, DINO v1 flags) or logistic regression on a frozen backbone.",
    group="eval",
    default_config="linear",
    flags=[
        Flag(
            ("--protocol",),
            "protocol",
            "linear: SGD grid of probes on augmented images; logreg: L-BFGS on features",
            choices=("linear", "logreg"),
        ),
    ]
    + backbone_flags()
    + image_flags()
    + [
        Flag(("--epochs",), "linear.epochs", "training epochs of the linear probes", type=int, metavar="N"),
        Flag(
            ("--lr",),
            "linear.learning_rates",
            "base learning rate(s) at batch 256; given: only these",
            type=float,
            nargs="+",
            metavar="LR",
        ),
        Flag(
            ("--n_last_blocks",),
            "linear.n_last_blocks",
            "[CLS] of the last n blocks; given: only these",
            type=int,
            nargs="+",
            metavar="N",
        ),
        Flag(
            ("--avgpool_patchtokens",),
            "linear.avgpool_patchtokens",
            "also use the mean patch token; given: only this",
            type=bool_flag,
        ),
        Flag(("--val_freq",), "linear.val_every_epochs", "evaluate every N epochs", type=int, metavar="N"),
    ]
    + device_flags()
    + feature_cache_flags()
    + [
        Flag(("--output_dir",), "output_dir", "checkpoints, tensorboard curves and results", metavar="DIR"),
    ],
    epilog=__doc__.split("\n\n")[1],
)


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, _ = CLI.parse(argv)
    if cfg.protocol == "logreg":
        from dino.eval.logreg import run_logreg

        return run_logreg(cfg)
    from dino.eval.linear import run_linear

    return run_linear(cfg)
