"""Linear semantic segmentation of a frozen backbone (DINOv2's "lin." and "+ms" protocols), scored as mmsegmentation.

    dino eval-segmentation --dataset ade20k --data_path /data/ADEChallengeData2016 --pretrained_weights ckpt.pth
    dino eval-segmentation --config segmentation_ms --dataset voc2012 --data_path /data/VOCdevkit/VOC2012 --pretrained_weights dinov2_vits14
    dino eval-segmentation --dataset cityscapes --data_path /data/cityscapes --pretrained_weights ckpt.pth augmentation.scale=[2048,1024]
    torchrun --nproc_per_node 8 -m dino eval-segmentation --dataset ade20k --data_path DIR --pretrained_weights ckpt.pth

A frozen backbone; a BatchNorm + 1x1 conv head on the last block's patch tokens (lin.) or on the last four
blocks' (+ms) is trained with AdamW and a poly schedule, then evaluated with sliding windows (+ms: several
scales and flips). Reports mIoU, mAcc, aAcc and per-class IoU exactly as mmsegmentation (ignore 255, ADE20K's
reduce_zero_label), into <output_dir>/segmentation_results.json, with tensorboard curves and a picture of
predictions beside the ground truth. Rerun with the same --output_dir to resume. Every default (and where
it comes from) is in dino/configs/eval/segmentation.yaml and segmentation_ms.yaml.
"""

from __future__ import annotations

from typing import Sequence

from dino.config import ConfigCLI, Flag
from dino.eval.cli_flags import backbone_flags, device_flags

CLI = ConfigCLI(
    description="Linear semantic segmentation probe (DINOv2 lin. / +ms) on a frozen backbone: ADE20K, Pascal VOC 2012, Cityscapes.",
    group="eval",
    default_config="segmentation",
    flags=[
        Flag(
            ("--dataset",),
            "dataset",
            "dataset, in its official layout under --data_path",
            choices=("ade20k", "voc2012", "cityscapes", "demo"),
        ),
        Flag(
            ("--data_path",),
            "data_path",
            "dataset root (ADEChallengeData2016, VOC2012 or the Cityscapes root; "
            "demo: empty generates the demo images with their known masks)",
            metavar="PATH",
        ),
    ]
    + backbone_flags()
    + [
        Flag(
            ("--layers",),
            "head.layers",
            "blocks whose patch tokens the head reads (lin.: 1, +ms: 4)",
            type=int,
            metavar="N",
        ),
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
            ("--crop_size",), "augmentation.crop_size", "training crop (height width)", type=int, nargs=2, metavar="PX"
        ),
        Flag(("--test_mode",), "test.mode", "sliding windows or the whole resized image", choices=("slide", "whole")),
        Flag(("--test_crop_size",), "test.crop_size", "sliding window (height width)", type=int, nargs=2, metavar="PX"),
        Flag(("--test_stride",), "test.stride", "sliding window step (height width)", type=int, nargs=2, metavar="PX"),
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
    from dino.eval.segmentation import run_segmentation

    try:
        return run_segmentation(cfg)
    finally:  # leave the process group before the interpreter exits (gloo can abort in its threads otherwise)
        destroy_distributed()
