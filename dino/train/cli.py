"""`main_dino.py`: the DINO v1 / Habana flags, mapped onto config keys, plus `--config` and key=value overrides."""

from __future__ import annotations

import sys
from typing import Sequence

from dino.config import ConfigCLI, Flag, bool_flag, precision_flags
from dino.errors import run_cli

FLAGS = [
    Flag(("--arch",), "model.arch", "backbone size: vit_tiny, vit_small, vit_base, vit_large, vit_giant2"),
    Flag(("--patch_size",), "model.patch_size", "patch size in pixels (8, 14, 16)", type=int),
    Flag(("--num_register_tokens",), "model.num_register_tokens", "register tokens (DINOv2 _reg models: 4)", type=int),
    Flag(("--drop_path_rate",), "model.drop_path_rate", "stochastic depth rate", type=float),
    Flag(("--out_dim",), "dino.head_n_prototypes", "prototypes K of the DINO head", type=int),
    Flag(("--norm_last_layer",), "dino.norm_last_layer", "keep the head's prototypes at unit norm", type=bool_flag),
    Flag(("--use_bn_in_head",), "dino.use_bn_in_head", "BatchNorm in the head's MLP", type=bool_flag),
    Flag(
        ("--momentum_teacher",), "teacher.momentum_teacher", "base EMA momentum of the teacher (cosine → 1)", type=float
    ),
    Flag(("--warmup_teacher_temp",), "teacher.warmup_teacher_temp", "teacher temperature at the start", type=float),
    Flag(("--teacher_temp",), "teacher.teacher_temp", "teacher temperature after the warm-up", type=float),
    Flag(
        ("--warmup_teacher_temp_epochs",),
        "teacher.warmup_teacher_temp_epochs",
        "teacher temperature warm-up epochs",
        type=int,
    ),
    Flag(("--weight_decay",), "optim.weight_decay", "weight decay at the start (cosine schedule)", type=float),
    Flag(("--weight_decay_end",), "optim.weight_decay_end", "weight decay at the end", type=float),
    Flag(("--clip_grad",), "optim.clip_grad", "gradient clipping threshold (0: off)", type=float),
    Flag(
        ("--batch_size_per_device", "--batch_size_per_gpu"),
        "train.batch_size_per_device",
        "images per device and step",
        type=int,
    ),
    Flag(("--epochs",), "optim.epochs", "training epochs", type=int),
    Flag(("--freeze_last_layer",), "optim.freeze_last_layer", "epochs with the head's last layer frozen", type=int),
    Flag(("--lr",), "optim.lr", "reference learning rate (scaled to the global batch by optim.lr_scaling)", type=float),
    Flag(("--warmup_epochs",), "optim.warmup_epochs", "linear lr warm-up epochs", type=int),
    Flag(("--min_lr",), "optim.min_lr", "final learning rate of the cosine schedule", type=float),
    Flag(("--optimizer",), "optim.optimizer", "adamw or sgd", choices=("adamw", "sgd")),
    Flag(
        ("--global_crops_scale",),
        "crops.global_crops_scale",
        "RandomResizedCrop scale range of global crops (two floats)",
        type=float,
        nargs=2,
    ),
    Flag(
        ("--local_crops_number",), "crops.local_crops_number", "number of local crops (0: global crops only)", type=int
    ),
    Flag(
        ("--local_crops_scale",),
        "crops.local_crops_scale",
        "RandomResizedCrop scale range of local crops (two floats)",
        type=float,
        nargs=2,
    ),
    Flag(("--global_crops_size",), "crops.global_crops_size", "global crop size in pixels", type=int),
    Flag(("--local_crops_size",), "crops.local_crops_size", "local crop size in pixels", type=int),
    Flag(
        ("--data_path",),
        "train.data_path",
        "folder of images (ImageFolder, flat or nested) or a .txt list; empty: the demo dataset",
    ),
    Flag(("--output_dir",), "train.output_dir", "where checkpoints, logs and tensorboard go"),
    Flag(("--saveckp_freq",), "train.saveckp_freq", "keep a checkpoint copy every N epochs", type=int),
    Flag(("--seed",), "train.seed", "random seed", type=int),
    Flag(("--num_workers",), "train.num_workers", "data-loading workers per process", type=int),
    *precision_flags("train.precision"),
    Flag(("--device",), "train.device", "auto, cuda, hpu, mps or cpu", choices=("auto", "cuda", "hpu", "mps", "cpu")),
    Flag(
        ("--parallel",),
        "train.parallel",
        "data parallelism across processes: ddp, or fsdp (FSDP2, sharded checkpoints)",
        choices=("ddp", "fsdp"),
    ),
    Flag(
        ("--compile",),
        "train.compile",
        "torch.compile every transformer block (the first step compiles)",
        type=bool_flag,
    ),
    Flag(
        ("--dist_timeout",),
        "train.dist_timeout",
        "seconds a collective may wait for the other ranks; the error then names the rank that did not answer",
        type=float,
    ),
    Flag(("--resume",), "train.resume", "continue from output_dir/checkpoint.pth when present", type=bool_flag),
    Flag(("--max_iters",), "train.max_iters", "stop (with a checkpoint) after this many iterations", type=int),
    Flag(
        ("--pretrained_weights",),
        "model.pretrained_weights",
        "continued pretraining: start student and teacher from this backbone (file, or hub name such as dinov2_vits14, "
        "dinov3_vits16); arch, patch size and registers are read from it; heads too when it is one of our training "
        "checkpoints, else fresh heads are fitted first (--head_warmup_iters)",
    ),
    Flag(
        ("--head_warmup_iters",),
        "train.head_warmup_iters",
        "iterations with the pretrained backbone frozen while fresh heads fit (Sinkhorn-Knopp targets); "
        "default: 10 %% of the run when the heads are fresh",
        type=int,
    ),
    Flag(
        ("--backbone_lr_mult",),
        "optim.backbone_lr_mult",
        "lr factor of the student backbone after the warm-up (with optim.layerwise_decay; e.g. 0.2)",
        type=float,
    ),
    Flag(
        ("--layerwise_decay",),
        "optim.layerwise_decay",
        "layer-wise lr decay: block i of n gets lr × decay^(n-i), the patch embedding decay^(n+1)",
        type=float,
    ),
    Flag(
        ("--lora_rank",),
        "model.lora_rank",
        "freeze the backbone and train rank-r LoRA adapters on its qkv/proj layers (model.lora_targets) and the heads: "
        "no gradients or AdamW state for the backbone (ViT-L/14, r=8: 1.2 M trained values instead of 304 M); "
        "merged into the exported backbone",
        type=int,
    ),
    Flag(
        ("--distill_from",),
        "distill.teacher",
        "distillation: this frozen backbone (file or hub name, any size/generation) is the teacher instead of the "
        "EMA; the student is model.*, its EMA is exported; teacher heads from the file or fitted first",
    ),
    Flag(
        ("--feature_distill",),
        "distill.feature_loss_weight",
        "with --distill_from: weight of a loss regressing the student's [CLS] and patch tokens, through a trained "
        "projection, onto the teacher's (distill.feature_loss cosine|smooth_l1)",
        type=float,
    ),
    Flag(
        ("--knn_eval",),
        "train.knn_eval",
        "after training, kNN of the teacher vs a random backbone on the val split",
        type=bool_flag,
    ),
]

EPILOG = """\
examples:
  python main_dino.py                                    # CPU demo on the built-in dataset (config 'demo')
  python main_dino.py --config dino_vits16 --data_path /data/imagenet/train --output_dir runs/vits16
  torchrun --nproc_per_node=2 main_dino.py --arch vit_small --hmp      # 2 CPU processes (gloo), demo dataset
  torchrun --nproc_per_node=8 main_dino.py --config dinov2_vits14 --data_path DIR --hmp
  torchrun --nproc_per_node=8 main_dino.py --config dinov2_vitl14 --data_path DIR --hmp --parallel fsdp
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 --rdzv_id=JOB \
      main_dino.py --config dinov2_vitl14 --data_path DIR --hmp --parallel fsdp   # run the same line on every node
  python -m dino.run.slurm --nodes 2 --gpus_per_node 8 -- --config dinov2_vitl14 --parallel fsdp --hmp
  python main_dino.py --arch vit_small --patch_size 16 --data_path DIR --epochs 1 optim.lr=1e-3 ibot.loss_weight=1.0
  python main_dino.py --config dinov2_vits14 --pretrained_weights dinov2_vits14 --data_path DIR \
      --head_warmup_iters 500 --backbone_lr_mult 0.2 --layerwise_decay 0.9 --lr 1e-4  # continue on your images
  python main_dino.py --config dinov2_vits14 --arch vit_small --distill_from runs/vitb/checkpoint.pth --data_path DIR

Presets live in dino/configs/train/ (and $DINO_CONFIG_DIR/train/); any config key can be overridden as key=value
after the flags. `dino train` takes the same flags.
"""

CLI = ConfigCLI(
    description="Self-supervised training of a ViT with DINO / DINOv2 (self-distillation, multi-crop, iBOT, KoLeo).",
    group="train",
    default_config="demo",
    flags=FLAGS,
    epilog=EPILOG,
)


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, _ = CLI.parse(argv)
    from dino.config_validation import check_resume_against_output_dir, validate_training_config
    from dino.train.distill import prepare_distillation
    from dino.train.pretrained import prepare_config

    prepare_config(cfg)  # --pretrained_weights: model.* follows the file (read once, kept for train())
    prepare_distillation(cfg)
    # Everything the user can get wrong is reported before the device, the data or config.yaml are touched.
    validate_training_config(cfg)
    # presets with recipe.auto (small_data): crops, patch, epochs and warm-up derived from the images, printed;
    # keys set on the command line are kept
    from dino.train.recipe import apply_recipe_for_cli

    if apply_recipe_for_cli(cfg, argv, {name: flag.key for flag in FLAGS for name in flag.names}) is not None:
        validate_training_config(cfg)
    check_resume_against_output_dir(cfg)
    from dino.train.knn_check import report_knn_if_requested
    from dino.train.loop import train

    result = train(cfg)
    if not result.stopped_early:
        result.knn = report_knn_if_requested(cfg, result)
    return result


def cli() -> None:
    run_cli(main)
