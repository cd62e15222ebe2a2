"""Checks of a composed training config, run before anything is built, and of a resumed run against its checkpoint.

`validate_training_config(cfg)` looks at every key the training loop reads (types, ranges, choices, the output
folder) and reports **all** problems at once as one `UserError` line, before the device, the data set, the
networks or `config.yaml` are touched: a typo in `optim.lr=abc` or `--num_workers -1` should cost a second,
not a traceback after minutes of dataset scanning.

`check_resume_compatible(saved_cfg, cfg)` compares the config stored in a training checkpoint with the one a
resumed run was started with and names every key that would silently change what the checkpoint means (the
architecture, the heads, the batch the data position counts in).  `check_resume_against_output_dir` reads
the stored config from the checkpoint in an output folder (cheaply: the checkpoint is memory-mapped, its
tensors are never read) and runs that check.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from dino.errors import UserError, suggest

_MISSING = object()


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but `optim.lr=true` is a mistake, not the number 1
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    """Collects problems instead of stopping at the first, so one run of the command lists them all."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.problems: list[str] = []

    def get(self, key: str) -> Any:
        try:
            value = OmegaConf.select(self.cfg, key, default=_MISSING, throw_on_missing=True)
        except Exception as err:  # an interpolation that does not resolve, a '???' value
            self.problems.append(f"{key}: {(str(err).splitlines() or [type(err).__name__])[0]}")
            return _MISSING
        if isinstance(value, (ListConfig, DictConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        return value

    def number(
        self,
        key: str,
        minimum: float | None = None,
        maximum: float | None = None,
        *,
        integer: bool = False,
        min_inclusive: bool = True,
        max_inclusive: bool = True,
        optional: bool = False,
        reason: str = "",
    ) -> Any:
        value = self.get(key)
        if value is _MISSING or (optional and value is None):
            return None if value is None else _MISSING
        kind = "an integer" if integer else "a number"
        if not (_is_int(value) if integer else _is_number(value)):
            self.problems.append(f"{key} must be {kind}, got {value!r}")
            return _MISSING
        low_ok = minimum is None or (value >= minimum if min_inclusive else value > minimum)
        high_ok = maximum is None or (value <= maximum if max_inclusive else value < maximum)
        if not (low_ok and high_ok):
            bounds = []
            if minimum is not None:
                bounds.append(f"{'≥' if min_inclusive else '>'} {minimum:g}")
            if maximum is not None:
                bounds.append(f"{'≤' if max_inclusive else '<'} {maximum:g}")
            self.problems.append(f"{key} must be {' and '.join(bounds)}{reason}, got {value!r}")
        return value

    def choice(self, key: str, choices: Sequence[str]) -> Any:
        value = self.get(key)
        if value is not _MISSING and value not in choices:
            hint = suggest(str(value), choices)
            self.problems.append(
                f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}"
                + (f" ({hint.strip()})" if hint else "")
            )
        return value

    def boolean(self, key: str) -> None:
        value = self.get(key)
        if value is not _MISSING and not isinstance(value, bool):
            self.problems.append(f"{key} must be true or false, got {value!r}")

    def pair(self, key: str, low: float, high: float, *, low_open: bool) -> None:
        """Two numbers min ≤ max inside [low, high] (low excluded with `low_open`)."""
        value = self.get(key)
        if value is _MISSING:
            return
        rule = f"{low:g} {'<' if low_open else '≤'} min ≤ max ≤ {high:g}"
        if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)):
            self.problems.append(f"{key} must be two numbers min max with {rule}, got {value!r}")
            return
        a, b = value
        if (a <= low if low_open else a < low) or a > b or b > high:
            self.problems.append(f"{key} must satisfy {rule}, got {value!r}")

    def probabilities(self, key: str) -> None:
        value = self.get(key)
        if value is _MISSING:
            return
        values = value if isinstance(value, list) else [value]
        if not values or not all(_is_number(v) and 0 <= v <= 1 for v in values):
            self.problems.append(f"{key} must hold probabilities in [0, 1], got {value!r}")


def output_dir_problem(path: str | os.PathLike, what: str = "output directory") -> str | None:
    """Why `path` cannot be used as an output folder (a file, under a file, not writable), or None when it can.

    Nothing is created: the nearest existing folder on the way must be a writable folder, so the run can make
    the rest later.
    """
    text = os.fspath(path)
    if not text:
        return f"{what} is empty"
    target = Path(os.path.expanduser(text)).absolute()
    if target.exists() and not target.is_dir():
        return f"{what} {target} exists and is not a directory"
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{what} {target} cannot be created: {probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return (
            f"{what} {target} is not writable ({probe} does not allow writing)"
            if probe != target
            else f"{what} {target} is not writable"
        )
    return None


def text_list_problem(path: str | os.PathLike) -> str | None:
    """Why a `.txt` image list cannot be read as UTF-8 text (naming the line), or None when it can."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return f"cannot read the image list {path}: {err.strerror or err}"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return (
            f"the image list {path} is not UTF-8 text (byte {data[err.start : err.start + 1]!r} on line {line}); "
            "save it as UTF-8"
        )
    return None


def validate_training_config(cfg: DictConfig) -> None:
    """Raise one `UserError` listing every invalid value of a training config (see the module docstring)."""
    from dino.models import ARCH_SIZES
    from dino.train.schedules import LR_SCALING_RULES

    c = _Checker(cfg)
    # model
    c.choice("model.arch", list(ARCH_SIZES))
    patch = c.number("model.patch_size", 1, integer=True)
    c.number("model.depth", 1, integer=True, optional=True)
    c.number("model.embed_dim", 1, integer=True, optional=True)
    c.number("model.drop_path_rate", 0, 1, max_inclusive=False)
    c.choice("model.drop_path_mode", ("mask", "subset"))
    c.number("model.layerscale", 0, optional=True)
    from dino.models.vision_transformer import FFN_LAYERS

    c.choice("model.ffn_layer", list(FFN_LAYERS))
    c.number("model.num_register_tokens", 0, integer=True)
    c.number("model.interpolate_offset", 0)
    # heads and losses
    c.choice("dino.loss_style", ("v1", "v2", None))  # shorthand for the three switches below
    c.choice("dino.center_update", ("immediate", "deferred"))
    c.choice("dino.pair_normalisation", ("pair_mean", "dinov2"))
    c.boolean("teacher.temp_per_iteration")
    c.number("dino.loss_weight", 0)
    c.number("dino.head_n_prototypes", 1, integer=True, reason=" (--out_dim: prototypes of the DINO head)")
    for key in ("dino.head_hidden_dim", "dino.head_bottleneck_dim", "dino.head_nlayers"):
        c.number(key, 1, integer=True)
    c.choice("dino.centering", ("softmax", "sinkhorn_knopp"))
    c.number("dino.student_temp", 0, min_inclusive=False)
    c.number("dino.center_momentum", 0, 1)
    koleo = c.number("dino.koleo_loss_weight", 0)
    ibot = c.number("ibot.loss_weight", 0)
    c.probabilities("ibot.mask_sample_probability")
    c.pair("ibot.mask_ratio_min_max", 0, 1, low_open=False)
    c.number("ibot.mask_block_min_patches", 1, integer=True)
    c.number("ibot.mask_block_max_fraction", 0, 1, min_inclusive=False)
    c.number("ibot.mask_block_min_aspect", 0, 1, min_inclusive=False)
    if _is_number(ibot) and ibot > 0:
        for key in ("ibot.head_n_prototypes", "ibot.head_hidden_dim", "ibot.head_bottleneck_dim", "ibot.head_nlayers"):
            c.number(key, 1, integer=True)
    # teacher
    c.number("teacher.momentum_teacher", 0, 1, reason=" (EMA momentum)")
    c.number("teacher.final_momentum_teacher", 0, 1, reason=" (EMA momentum)")
    c.number("teacher.warmup_teacher_temp", 0, min_inclusive=False)
    c.number("teacher.teacher_temp", 0, min_inclusive=False)
    c.number("teacher.warmup_teacher_temp_epochs", 0, integer=True)
    # optimisation
    c.choice("optim.optimizer", ("adamw", "sgd"))
    c.number("optim.epochs", 1, integer=True)
    c.number("optim.iters_per_epoch", 1, integer=True, optional=True)
    c.number("optim.lr", 0)
    c.choice("optim.lr_scaling", tuple(LR_SCALING_RULES))
    c.number("optim.warmup_epochs", 0, integer=True)
    c.number("optim.min_lr", 0)
    c.number("optim.weight_decay", 0)
    c.number("optim.weight_decay_end", 0)
    c.number("optim.clip_grad", 0, reason=" (0 disables clipping)")
    c.choice("optim.clip_style", ("per_parameter", "per_module"))
    c.number("optim.freeze_last_layer", 0, integer=True)
    c.number("optim.layerwise_decay", 0, 1, min_inclusive=False)
    c.number("optim.patch_embed_lr_mult", 0)
    c.number("optim.backbone_lr_mult", 0)
    c.number("train.head_warmup_iters", 0, integer=True, optional=True)
    lora = c.number("model.lora_rank", 0, integer=True)
    c.number("model.lora_alpha", 0, min_inclusive=False, optional=True)
    if _is_int(lora) and lora > 0 and c.get("train.parallel") == "fsdp":
        c.problems.append(
            "model.lora_rank > 0 runs with --parallel ddp (LoRA saves the backbone's optimiser state; "
            "FSDP is not needed for it)"
        )
    feature = c.number("distill.feature_loss_weight", 0)
    c.choice("distill.feature_loss", ("cosine", "smooth_l1"))
    c.number("distill.feature_patch_weight", 0)
    if _is_number(feature) and feature > 0:
        if not c.get("distill.teacher"):
            c.problems.append("distill.feature_loss_weight > 0 needs a teacher to regress onto (--distill_from)")
        if _is_int(parts := c.get("train.grad_accumulation_steps")) and parts > 1:
            c.problems.append("distill.feature_loss_weight > 0 does not run with train.grad_accumulation_steps > 1 yet")
    for key in ("model.pretrained_weights", "distill.teacher"):
        source = c.get(key)
        if source is not _MISSING and source is not None and not isinstance(source, str):
            c.problems.append(f"{key} must be a file or a hub name, got {source!r}")
    betas = c.get("optim.adamw_betas")
    if betas is not _MISSING and not (
        isinstance(betas, list) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)
    ):
        c.problems.append(f"optim.adamw_betas must be two numbers in [0, 1), got {betas!r}")
    c.number("optim.sgd_momentum", 0, 1, max_inclusive=False)
    # crops
    c.pair("crops.global_crops_scale", 0, 1, low_open=True)
    c.pair("crops.local_crops_scale", 0, 1, low_open=True)
    local_number = c.number("crops.local_crops_number", 0, integer=True)
    sizes = {key: c.number(key, 1, integer=True) for key in ("crops.global_crops_size", "crops.local_crops_size")}
    if _is_int(patch) and patch > 0:
        for key, size in sizes.items():
            if key == "crops.local_crops_size" and local_number == 0:
                continue
            if _is_int(size) and size > 0 and size % patch:
                c.problems.append(f"{key} {size} must be a multiple of the patch size {patch}")
    c.probabilities("crops.blur_probs")
    c.probabilities("crops.solarization_prob")
    # training run
    batch = c.number("train.batch_size_per_device", 1, integer=True)
    if _is_int(batch) and batch == 1 and _is_number(koleo) and koleo > 0:
        c.problems.append(
            "train.batch_size_per_device must be at least 2 with KoLeo (dino.koleo_loss_weight > 0): "
            "its nearest-neighbour term needs two images per device"
        )
    c.number("train.num_workers", 0, integer=True)
    c.number("train.seed", 0, integer=True)
    c.number("train.saveckp_freq", 0, integer=True)
    c.number("train.log_freq", 1, integer=True)
    c.number("train.max_iters", 1, integer=True, optional=True)
    c.number("train.checkpoint_every_iters", 0, integer=True)
    c.number("train.visualize_freq", 0, integer=True)
    for key in (
        "train.resume",
        "model.qkv_bias",
        "model.use_mask_token",
        "dino.norm_last_layer",
        "dino.use_bn_in_head",
        "ibot.separate_head",
    ):
        c.boolean(key)
    from dino.distributed.device import PRECISIONS

    precision = c.choice("train.precision", PRECISIONS)
    if precision == "fp16" and c.get("train.device") not in ("auto", "cuda", _MISSING):
        c.problems.append(
            f"train.precision fp16 needs a CUDA device (train.device is {c.get('train.device')!r}); "
            "use bf16 (--hmp) there"
        )
    c.choice("train.device", ("auto", "cuda", "hpu", "mps", "cpu"))
    c.choice("train.parallel", ("ddp", "fsdp"))
    if not isinstance(c.get("train.compile"), bool) and c.get("train.compile") is not _MISSING:
        c.choice("train.compile", ("auto",))  # true | false | auto (on CUDA only)
    c.choice("train.activation_checkpointing", ("none", "full", "selective"))
    parts = c.number("train.grad_accumulation_steps", 1, integer=True)
    if _is_int(parts) and _is_int(batch) and parts > 1 and batch % parts:
        c.problems.append(
            f"train.batch_size_per_device {batch} must be a multiple of train.grad_accumulation_steps "
            f"{parts} (the batch is split into equal parts)"
        )
    if OmegaConf.select(cfg, "train.knn_eval", default=False) is True:
        c.number("train.knn_k", 1, integer=True)
        c.number("train.knn_temperature", 0, min_inclusive=False)
    data_path = c.get("train.data_path")
    if isinstance(data_path, str) and data_path:
        expanded = os.path.expanduser(data_path)
        if not os.path.exists(expanded):
            c.problems.append(f"train.data_path does not exist: {data_path}")
        elif (
            os.path.isfile(expanded) and expanded.lower().endswith(".txt") and (problem := text_list_problem(expanded))
        ):
            c.problems.append(problem)
    output_dir = c.get("train.output_dir")
    if output_dir is not _MISSING:
        problem = output_dir_problem(str(output_dir) if output_dir is not None else "", "train.output_dir")
        if problem:
            c.problems.append(problem)
    if c.problems:
        raise UserError(
            f"invalid training config ({len(c.problems)} problem{'s' if len(c.problems) > 1 else ''}): "
            + "; ".join(c.problems)
        )


# ------------------------------------------------------------------------------------------------ resume

# Keys a resumed run must share with its checkpoint: they fix the shapes *and meanings* of the saved weights
# and optimiser state (a changed arch can keep every shape while changing the number of attention heads).
RESUME_KEYS: tuple[str, ...] = (
    "model.arch",
    "model.patch_size",
    "model.depth",
    "model.embed_dim",
    "model.num_register_tokens",
    "model.ffn_layer",
    "model.layerscale",
    "model.qkv_bias",
    "dino.head_n_prototypes",
    "dino.head_hidden_dim",
    "dino.head_bottleneck_dim",
    "dino.head_nlayers",
    "dino.use_bn_in_head",
    "dino.centering",
    "ibot.separate_head",
    "ibot.head_n_prototypes",
    "ibot.head_hidden_dim",
    "ibot.head_bottleneck_dim",
    "ibot.head_nlayers",
    "optim.optimizer",
    "optim.iters_per_epoch",
)
# The data position and the schedules of a checkpoint count global batches; per device × processes.
BATCH_KEY = "train.batch_size_per_device"


def _value(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, default=_MISSING)
    except Exception:
        return _MISSING
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (ListConfig, DictConfig)) else value


def resume_differences(
    saved_cfg: DictConfig, cfg: DictConfig, saved_world_size: int | None = None, world_size: int | None = None
) -> list[str]:
    """'key saved → now' for every key in `RESUME_KEYS` (and the global batch) that differs."""
    differences = []
    ibot_on = [
        (_value(c, "ibot.loss_weight") or 0) > 0
        for c in (saved_cfg, cfg)
        if _is_number(_value(c, "ibot.loss_weight") or 0)
    ]
    for key in RESUME_KEYS:
        if key.startswith("ibot.") and not any(ibot_on):
            continue  # no iBOT head in either run: its settings mean nothing
        saved, now = _value(saved_cfg, key), _value(cfg, key)
        if saved is _MISSING or now is _MISSING:
            continue  # a checkpoint from a version without this key: nothing to compare
        if saved != now:
            differences.append(f"{key} {saved!r} → {now!r}")
    if len(set(ibot_on)) > 1:
        differences.append(
            f"ibot.loss_weight {_value(saved_cfg, 'ibot.loss_weight')!r} → "
            f"{_value(cfg, 'ibot.loss_weight')!r} (iBOT head on/off)"
        )
    saved_batch, batch = _value(saved_cfg, BATCH_KEY), _value(cfg, BATCH_KEY)
    if _is_int(saved_batch) and _is_int(batch):
        if saved_world_size and world_size:
            if saved_batch * saved_world_size != batch * world_size:
                differences.append(
                    f"global batch {saved_batch * saved_world_size} ({saved_world_size} × {saved_batch}) → "
                    f"{batch * world_size} ({world_size} × {batch})"
                )
        elif saved_batch != batch:
            differences.append(f"{BATCH_KEY} {saved_batch!r} → {batch!r}")
    return differences


def check_resume_compatible(
    saved_cfg: DictConfig,
    cfg: DictConfig,
    source: str = "the checkpoint",
    saved_world_size: int | None = None,
    world_size: int | None = None,
) -> None:
    """UserError naming what differs between a checkpoint's config and this run's, when anything that matters does.

    Pure: reads nothing but the two configs. With both world sizes known the global batch is compared (what
    a sharded checkpoint needs), otherwise the per-device batch.
    """
    differences = resume_differences(saved_cfg, cfg, saved_world_size, world_size)
    if differences:
        raise UserError(
            f"cannot resume from {source}: this run's config differs from the one it was trained with "
            f"({'; '.join(differences)}); restore those values, choose another --output_dir, "
            "or pass --resume false to start over"
        )


def read_checkpoint_config(path: str | os.PathLike) -> tuple[DictConfig, int | None] | None:
    """(stored config, world size when recorded) of a training checkpoint (file or sharded folder), or None.

    None when the checkpoint cannot be read here: the training loop's own loading then reports why.
    """
    import json

    import torch

    path = Path(path)
    text: str | None = None
    world_size = None
    try:
        if path.is_dir():
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
            text = meta.get("config")
        else:
            try:  # memory-mapped: only the small entries are read, never the weights
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict):
                text = state.get("config")
                # recorded by checkpoints that store their world size: then the global batch is compared
                world_size = state.get("world_size") if _is_int(state.get("world_size")) else None
    except Exception:
        return None
    if not isinstance(text, str):
        return None
    try:
        saved = OmegaConf.create(text)
    except Exception:
        return None
    if not isinstance(saved, DictConfig):
        return None
    from dino.config import upgrade_legacy_keys

    return upgrade_legacy_keys(saved), world_size  # train.hmp / train.fp16 → train.precision, loss_style spelled out


def check_resume_against_output_dir(cfg: DictConfig, world_size: int | None = None) -> None:
    """When this run will resume (train.resume and a checkpoint in train.output_dir), compare the configs.

    Called before the training loop writes `config.yaml`, so a refused resume leaves the folder as it was.
    """
    if not bool(OmegaConf.select(cfg, "train.resume", default=False)):
        return
    from dino.train.checkpoint import find_training_checkpoint

    output_dir = Path(os.path.expanduser(str(cfg.train.output_dir)))
    if not output_dir.is_dir():
        return
    sharded = str(OmegaConf.select(cfg, "train.parallel", default="ddp")) == "fsdp"
    checkpoint = find_training_checkpoint(output_dir, sharded)
    if checkpoint is None:
        return
    stored = read_checkpoint_config(checkpoint)
    if stored is None:
        return
    saved_cfg, saved_world_size = stored
    # A sharded checkpoint resumes on any number of processes and the loop checks its global batch itself;
    # a single-file one records no world size, so the per-device batch is what can be compared.
    if sharded:
        saved_cfg = saved_cfg.copy()
        OmegaConf.update(saved_cfg, BATCH_KEY, _value(cfg, BATCH_KEY), merge=False)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)  # what torchrun / the SLURM launcher set
    check_resume_compatible(saved_cfg, cfg, str(checkpoint), saved_world_size, world_size)
