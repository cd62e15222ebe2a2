"""Linear monocular depth of a frozen backbone (DINOv2's "lin. 1" and "lin. 4" heads) on NYU-Depth v2 and KITTI.

    dino eval-depth --dataset nyu --data_path /data/nyu --pretrained_weights ckpt.pth
    dino eval-depth --config depth_lin4 --dataset kitti --data_path /data/kitti --pretrained_weights dinov2_vits14
    dino eval-depth --dataset nyu --data_path /data/nyu --loss regression --pretrained_weights ckpt.pth
    torchrun --nproc_per_node 8 -m dino eval-depth --dataset nyu --data_path DIR --pretrained_weights ckpt.pth

A frozen backbone; a BatchNorm + 1x1 conv head on the last block's (lin. 1) or four evenly spaced blocks'
(lin. 4) patch tokens with their [CLS] token, upsampled x4, predicting depth as 256-bin classification (the
paper) or by regression, trained with SigLoss + gradient loss. Reports RMSE, abs rel, sq rel, log10, RMSE log,
SILog and delta < 1.25^n, per image then averaged, inside the depth caps and the standard crop (NYU valid
region; KITTI Garg crop by default, --eval_crop eigen for Eigen's), into <output_dir>/depth_results.json,
with tensorboard curves and a picture of predictions beside the ground truth. Rerun with the same
--output_dir to resume. Every default (and where it comes from) is in dino/configs/eval/depth.yaml.
"""

from __future__ import annotations

from typing import Sequence

from dino.config import ConfigCLI, Flag
from dino.eval.cli_flags import backbone_flags, device_flags

CLI = ConfigCLI(
    description="Linear monocular depth probe (DINOv2 lin. 1 / lin. 4) on a frozen backbone: NYU-Depth v2, KITTI (Eigen split).",
    group="eval",
    default_config="depth",
    flags=[
        Flag(("--dataset",), "dataset", "dataset, in its layout under --data_path", choices=("nyu", "kitti")),
        Flag(
            ("--data_path",),
            "data_path",
            "dataset root (NYU: nyu_depth_v2_labeled.mat + splits.mat or "
            "nyu_train.txt/nyu_test.txt; KITTI: kitti_eigen_{train,test}.txt, input/, gt_depth/)",
            metavar="PATH",
        ),
    ]
    + backbone_flags()
    + [
        Flag(("--layers",), "head.layers", "blocks the head reads (lin. 1: 1, lin. 4: 4)", type=int, metavar="N"),
        Flag(
            ("--loss",),
            "head.loss",
            "256-bin classification (the paper) or regression",
            choices=("classification", "regression"),
        ),
        Flag(("--n_bins",), "head.n_bins", "depth bins of the classification head", type=int, metavar="N"),
        Flag(("--iterations",), "train.iterations", "training iterations of the head", type=int, metavar="N"),
        Flag(
            ("--batch_size_per_device", "--batch_size_per_gpu"),
            "train.batch_size_per_device",
            "training crops per batch per device",
            type=int,
            metavar="N",
        ),
        Flag(("--lr",), "train.lr", "AdamW peak learning rate", type=float, metavar="LR"),
        Flag(("--num_workers",), "train.num_workers", "data loading processes per device", type=int, metavar="N"),
        Flag(
            ("--crop_size",),
            "crop_size",
            "training crop (height width); default: the dataset's",
            type=int,
            nargs=2,
            metavar="PX",
        ),
        Flag(("--min_depth",), "min_depth", "depth cap below (m); default: the dataset's", type=float, metavar="M"),
        Flag(
            ("--max_depth",),
            "max_depth",
            "depth cap above (m); default: the dataset's (NYU 10, KITTI 80)",
            type=float,
            metavar="M",
        ),
        Flag(
            ("--eval_crop",),
            "eval_crop",
            "evaluation region; default: the dataset's (NYU: nyu, KITTI: garg)",
            choices=("none", "nyu", "eigen", "garg"),
        ),
        Flag(
            ("--num_pictures",),
            "num_pictures",
            "validation images drawn beside their ground truth",
            type=int,
            metavar="N",
        ),
    ]
    + device_flags(use_cuda_alias=False)
    + [
        Flag(
            ("--output_dir",), "output_dir", "head checkpoint, tensorboard curves, results and picture", metavar="DIR"
        ),
    ],
    epilog=__doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2],
)


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, _ = CLI.parse(argv)
    from dino.distributed import destroy_distributed
    from dino.eval.depth import run_depth

    try:
        return run_depth(cfg)
    finally:  # leave the process group before the interpreter exits (gloo can abort in its threads otherwise)
        destroy_distributed()
