"""Image retrieval on revisited Oxford / Paris (revisitop): mAP and mP@{1,5,10} for the Easy, Medium and Hard
protocols, with DINO v1's features ([CLS], thumbnail to --imsize, optional multi-scale).

Example:
    dino eval-retrieval --data_path /data/revisitop --dataset roxford5k --imsize 224 \\
        --pretrained_weights teacher_backbone.safetensors
"""

from __future__ import annotations

from dino.config import ConfigCLI, Flag, bool_flag
from dino.eval.cli_flags import backbone_flags, device_flags

FLAGS = (
    backbone_flags()
    + device_flags(use_cuda_alias=False)
    + [
        Flag(("--data_path",), "data_path", "folder holding roxford5k/ and/or rparis6k/ (jpg/ + gnd_<dataset>.pkl)"),
        Flag(("--dataset",), "dataset", "revisitop dataset: roxford5k | rparis6k"),
        Flag(("--imsize",), "imsize", "longer image side after PIL thumbnail", type=int),
        Flag(("--multiscale",), "multiscale", "average features over scales 1, 1/sqrt(2), 1/2", type=bool_flag),
        Flag(
            ("--crop_queries",), "crop_queries", "crop queries to their bounding box (DINO v1 does not)", type=bool_flag
        ),
        Flag(("--distractors",), "distractors", "folder of distractor images added to the database"),
        Flag(("--ranking",), "ranking", "ranking backend", choices=("auto", "torch", "faiss")),
        Flag(("--output_dir",), "output_dir", "where retrieval_<dataset>.json is written"),
        Flag(("--num_workers",), "num_workers", "data-loading workers", type=int),
    ]
)


def main(argv=None) -> dict:
    cli = ConfigCLI(__doc__.splitlines()[0], group="eval", default_config="retrieval", flags=FLAGS, epilog=__doc__)
    cfg, _ = cli.parse(argv)
    from dino.eval.retrieval import run_retrieval

    return run_retrieval(cfg)
