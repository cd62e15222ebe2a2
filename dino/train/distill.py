"""Distillation from a frozen teacher (`--distill_from`, `distill.teacher`), as DINOv3 distils its small models.

* The teacher is any backbone the loader reads (v1/v2/v3 releases by hub name, our files), of any size or
  generation, frozen (eval mode, no grad) for the whole run: its weights never change.
* Its DINO / iBOT heads come from the file when it is one of our training checkpoints; otherwise fresh heads
  are fitted to the frozen teacher backbone first (`fit_teacher_heads`: `train.head_warmup_iters` iterations,
  heads only, Sinkhorn-Knopp targets, an EMA of the heads as their own teacher), then frozen and written to
  `<output_dir>/distill_teacher_heads.pth` so a resumed run reuses them.
* The student (`model.*`, any architecture or size) learns the teacher's targets with the configured DINO /
  iBOT losses; its global crops are **not masked** (the iBOT term is taken at the mask positions of the unmasked
  crops); the EMA the loop keeps in `teacher` is the student EMA, and it is what the run exports.
* The heads' prototypes must match (the student's `dino.head_n_prototypes` / `ibot.head_n_prototypes`); with the
  iBOT term, the teacher's patch grid at the global crop size must equal the student's.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dino.distributed import all_reduce_mean, get_world_size, is_main_process
from dino.errors import UserError
from dino.log import get_logger
from dino.models import DINOHead
from dino.train.pretrained import StartingPoint, load_heads, read_starting_point

log = get_logger(__name__)


def _info(message: str) -> None:
    if is_main_process() and os.environ.get("RANK", "0") == "0":  # every rank reads the same file: say it once
        log.info(message)


HEADS_FILE = "distill_teacher_heads.pth"
_CACHE: dict[str, StartingPoint] = {}


def distilling(cfg: DictConfig) -> bool:
    return bool(str(OmegaConf.select(cfg, "distill.teacher") or ""))


def prepare_distillation(cfg: DictConfig) -> StartingPoint | None:
    """Read the teacher file once (kept for `build_distillation_target`) and check it against the student."""
    if not distilling(cfg):
        return None
    source = str(cfg.distill.teacher)
    if source not in _CACHE:
        _CACHE[source] = read_starting_point(source)
    point = _CACHE[source]
    if point.has_heads:
        for key in ("dino.head_n_prototypes", "ibot.head_n_prototypes", "ibot.separate_head"):
            theirs, ours = point.head_config.get(key), OmegaConf.select(cfg, key)
            if key.startswith("ibot") and float(cfg.ibot.loss_weight) <= 0:
                continue
            if theirs is not None and theirs != ours:
                raise UserError(
                    f"the teacher {source} has {key}={theirs}, the student {ours}: the heads' prototypes "
                    f"must match; set {key}={theirs}"
                )
    feature_patches = (
        float(OmegaConf.select(cfg, "distill.feature_loss_weight") or 0) > 0
        and float(OmegaConf.select(cfg, "distill.feature_patch_weight", default=1.0)) > 0
    )
    if float(cfg.ibot.loss_weight) > 0 or feature_patches:
        _check_patch_grid(cfg, point)
    return point


def _teacher_backbone(cfg: DictConfig, point: StartingPoint) -> nn.Module:
    from dino.hub import build_backbone_from_state_dict
    from dino.train.meta_arch import build_student_backbone

    if point.is_v3:
        backbone = build_backbone_from_state_dict(
            point.state_dict, None, None, attn_backend=str(cfg.model.attn_backend)
        )
    else:
        model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))  # not struct: the file's keys
        model_cfg = OmegaConf.merge(model_cfg, point.model_kwargs, {"drop_path_rate": 0.0})
        backbone, _ = build_student_backbone(model_cfg)
        backbone.load_state_dict(point.state_dict, strict=True)
    return backbone


def _head_settings(cfg: DictConfig, point: StartingPoint, prefix: str) -> dict[str, Any]:
    def value(key: str):
        return point.head_config.get(f"{prefix}.{key}", OmegaConf.select(cfg, f"{prefix}.{key}"))

    return dict(
        out_dim=int(value("head_n_prototypes")),
        nlayers=int(value("head_nlayers")),
        hidden_dim=int(value("head_hidden_dim")),
        bottleneck_dim=int(value("head_bottleneck_dim")),
        norm_last_layer=bool(point.head_config.get("dino.norm_last_layer", cfg.dino.norm_last_layer)),
    )


def build_distillation_target(cfg: DictConfig, student: nn.Module | None = None, teacher: nn.Module | None = None):
    """The frozen teacher network (backbone + heads) the student distils from.

    With `distill.feature_loss_weight` > 0, `student` (and its EMA `teacher`, a copy) get the linear projection
    `dino_head.feature_proj` (student width → teacher width) that the feature-distillation loss trains. It lives
    in the head (not used by its forward) so the backbone a checkpoint's `teacher` yields stays plain."""
    from dino.train.meta_arch import MultiCropNetwork

    point = prepare_distillation(cfg)
    _CACHE.pop(point.source, None)
    backbone = _teacher_backbone(cfg, point)
    use_ibot = float(cfg.ibot.loss_weight) > 0
    dim = backbone.embed_dim
    dino = _head_settings(cfg, point, "dino")
    dino_head = DINOHead(
        dim,
        dino.pop("out_dim"),
        use_bn=bool(point.head_config.get("dino.use_bn_in_head", cfg.dino.use_bn_in_head)),
        **dino,
    )
    separate = bool(point.head_config.get("ibot.separate_head", cfg.ibot.separate_head))
    ibot_head = None
    if use_ibot and separate:
        ibot = _head_settings(cfg, point, "ibot")
        ibot_head = DINOHead(dim, ibot.pop("out_dim"), **ibot)
    if float(OmegaConf.select(cfg, "distill.feature_loss_weight", default=0.0) or 0.0) > 0 and student is not None:
        student.dino_head.feature_proj = nn.Linear(student.backbone.embed_dim, dim)
        if teacher is not None:
            teacher.dino_head.feature_proj = copy.deepcopy(student.dino_head.feature_proj).requires_grad_(False)
    target = MultiCropNetwork(backbone, dino_head, ibot_head, use_ibot)
    target.heads_fitted = point.has_heads
    if point.has_heads:
        load_heads(target, point.heads, point.source)
    for param in target.parameters():
        param.requires_grad_(False)
    _info(
        f"distillation teacher from {point.source}: {point.summary}; heads "
        + (
            "from the file"
            if point.has_heads
            else f"fresh (fitted for {cfg.train.head_warmup_iters or 'auto'} iterations before distillation)"
        )
    )
    return target.eval()


def _check_patch_grid(cfg: DictConfig, point: StartingPoint) -> None:
    size, student_patch = int(cfg.crops.global_crops_size), int(cfg.model.patch_size)
    weight = point.state_dict.get("patch_embed.proj.weight")
    teacher_patch = int(weight.shape[-1]) if weight is not None else 32  # a ConvNeXt: stride-32 tokens
    if teacher_patch and size // teacher_patch != size // student_patch:
        raise UserError(
            f"the iBOT and feature terms compare patch tokens, but the teacher {point.source} "
            f"(patch {teacher_patch}) and the student (patch {student_patch}) tile a {size}-px crop into different grids; use a "
            f"student with patch size {teacher_patch} or set ibot.loss_weight=0 "
            "(and distill.feature_patch_weight=0)"
        )


def prepare_distillation_target(target, cfg: DictConfig, ctx, data, output_dir: Path, schedules):
    """Move the teacher to the device; fit fresh heads (or read the ones a previous run of this output_dir
    fitted). Returns the frozen teacher."""
    target.to(ctx.device)
    if target.heads_fitted:
        return target
    heads_file = Path(output_dir) / HEADS_FILE
    if bool(cfg.train.resume) and heads_file.is_file():
        state = torch.load(heads_file, map_location="cpu", weights_only=True)
        target.load_state_dict(state, strict=False)
        _info(f"distillation teacher heads read from {heads_file}")
    else:
        iters = OmegaConf.select(cfg, "train.head_warmup_iters")
        iters = max(1, len(schedules.lr) // 10) if iters is None else int(iters)
        if iters <= 0:
            log.warning(
                "distilling through fresh, unfitted teacher heads (train.head_warmup_iters=0): the targets "
                "are random projections of the teacher's features"
            )
        else:
            fit_teacher_heads(target, cfg, data, ctx, iters, schedules)
        if is_main_process():
            from dino.train.checkpoint import atomic_save

            heads = {k: v.detach().cpu() for k, v in target.state_dict().items() if not k.startswith("backbone.")}
            atomic_save(heads, heads_file)
    for param in target.parameters():
        param.requires_grad_(False)
    target.heads_fitted = True
    return target.eval()


def fit_teacher_heads(target, cfg: DictConfig, data, ctx, iters: int, schedules) -> list[float]:
    """Fit the teacher's fresh heads to its frozen backbone: `iters` steps of DINO (+ iBOT) self-distillation of
    the heads alone (Sinkhorn-Knopp targets from an EMA of the heads, AdamW at the run's peak lr). The backbone
    runs once per crop set, without grad. Gradients are averaged over ranks so every rank fits the same heads.
    Returns the losses."""
    from dino.train.meta_arch import SelfDistillationObjective

    fit_cfg = OmegaConf.merge(
        cfg,
        {"dino": {"centering": "sinkhorn_knopp", "koleo_loss_weight": 0.0}, "distill": {"feature_loss_weight": 0.0}},
    )
    objective = SelfDistillationObjective(fit_cfg, int(cfg.crops.local_crops_number)).to(ctx.device)
    names = [n for n in ("dino_head", "ibot_head") if getattr(target, n) is not None]
    students = {n: copy.deepcopy(getattr(target, n)).train() for n in names}
    params = [p for head in students.values() for p in head.parameters()]
    for param in params:
        param.requires_grad_(True)
    lr = max(schedules.lr.values) if hasattr(schedules.lr, "values") else float(cfg.optim.lr)
    optimizer = torch.optim.AdamW(params, lr=float(lr), weight_decay=float(cfg.optim.weight_decay))
    momentum = float(cfg.teacher.momentum_teacher)
    use_ibot = objective.ibot_loss is not None
    backbone = target.backbone.eval()
    losses: list[float] = []
    stream = data.stream(0, 0)
    try:
        for step in range(iters):
            _, _, batch = next(stream)
            batch = {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            mask_indices = batch["mask_indices_list"] if use_ibot else None
            with torch.no_grad(), ctx.autocast():
                glob = backbone.forward_features(batch["collated_global_crops"])
                local = batch["collated_local_crops"]
                local_cls = backbone.forward_features(local)["x_norm_clstoken"] if local.numel() else None
                patches = glob["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices) if use_ibot else None
                teacher_out = _heads_out(target.dino_head, target.ibot_head, glob["x_norm_clstoken"], None, patches)
                targets = objective.teacher_targets(
                    teacher_out, float(cfg.teacher.teacher_temp), batch.get("n_masked_patches")
                )
            with ctx.autocast():
                student_out = _heads_out(
                    students["dino_head"], students.get("ibot_head"), glob["x_norm_clstoken"], local_cls, patches
                )
                loss, _ = objective(
                    student_out, targets, batch.get("masks_weight"), n_images=batch["collated_global_crops"].shape[0]
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if get_world_size() > 1:
                for param in params:
                    if param.grad is not None:
                        all_reduce_mean(param.grad)
            optimizer.step()
            with torch.no_grad():
                for name, head in students.items():
                    torch._foreach_lerp_(
                        list(getattr(target, name).parameters()), list(head.parameters()), 1 - momentum
                    )
            losses.append(float(loss.detach()))
            if step == 0 or step + 1 == iters:
                _info(f"fitting the teacher's heads: step {step + 1}/{iters}, loss {losses[-1]:.4f}")
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return losses


def _heads_out(dino_head, ibot_head, cls_global, cls_local, patches) -> dict[str, Any]:
    """What `MultiCropNetwork.forward` returns, from ready backbone tokens."""
    inputs = [cls_global] + ([cls_local] if cls_local is not None else [])
    if patches is not None and ibot_head is None:
        inputs.append(patches)
    logits = dino_head(torch.cat(inputs))
    n_global, n_local = cls_global.shape[0], (cls_local.shape[0] if cls_local is not None else 0)
    global_logits, local_logits, patch_logits = logits.split([n_global, n_local, logits.shape[0] - n_global - n_local])
    masked = None
    if patches is not None:
        masked = patch_logits if ibot_head is None else ibot_head(patches)
    return {
        "global_cls_tokens": cls_global,
        "global_cls_logits": global_logits,
        "local_cls_logits": local_logits if n_local else None,
        "masked_patch_logits": masked,
    }
