"""DAVIS-2017 video object segmentation: propagate the first-frame labels with frozen patch features
(DINO v1's label propagation), write the predictions as palette PNGs and report J&F with the official metrics.

Examples:
    dino eval-davis --data_path /data/DAVIS --pretrained_weights teacher_backbone.safetensors \\
        --output_dir davis_predictions
    dino eval-davis --data_path /data/DAVIS --output_dir davis_predictions --eval_only
"""

from __future__ import annotations

from dino.config import ConfigCLI, Flag, bool_flag
from dino.eval.cli_flags import backbone_flags, device_flags

FLAGS = (
    backbone_flags()
    + device_flags(use_cuda_alias=False)
    + [
        Flag(("--data_path",), "data_path", "DAVIS-2017 folder (JPEGImages/480p, Annotations/480p, ImageSets/2017)"),
        Flag(("--split",), "split", "ImageSets/2017/<split>.txt"),
        Flag(("--n_last_frames",), "n_last_frames", "number of preceding frames used as context", type=int),
        Flag(
            ("--size_mask_neighborhood",),
            "size_mask_neighborhood",
            "spatial window radius in patches (0: none)",
            type=int,
        ),
        Flag(("--topk",), "topk", "affinities kept per target patch", type=int),
        Flag(("--frame_size",), "frame_size", "shorter frame side the frames are resized to", type=int),
        Flag(("--eval_only",), "eval_only", "only score the predictions already in --output_dir", type=bool_flag),
        Flag(("--output_dir",), "output_dir", "where predictions and results are written"),
    ]
)


def main(argv=None) -> dict:
    cli = ConfigCLI(
        __doc__.splitlines()[0], group="eval", default_config="video_segmentation", flags=FLAGS, epilog=__doc__
    )
    cfg, _ = cli.parse(argv)
    from dino.eval.label_propagation import run_video_segmentation

    return run_video_segmentation(cfg)
