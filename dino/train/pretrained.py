"""Continued pretraining from a released or earlier model (`--pretrained_weights`, `model.pretrained_weights`).

The file (or hub name) is read by the one backbone loader (`dino.hub`): DINO v1 / DINOv2 / DINOv3 releases by hub
name, our `teacher_backbone.safetensors` / `.pth`, our training checkpoints (`checkpoint.pth`, sharded folders).

* The student architecture follows the file: `model.arch`, `patch_size`, `depth`, `embed_dim`, registers,
  LayerScale, FFN, position-embedding size are replaced by what the file holds (`derive_config`; each change is
  logged). A DINOv3 file (RoPE ViT, ConvNeXt) is used as it is built by the loader.
* Student and teacher start from the file's backbone (the teacher of a training checkpoint). Heads come from
  the file when it is one of our training checkpoints (their sizes are then read from its config); otherwise
  they are initialised fresh and a **head warm-up** fits them first (`HeadWarmup`): for
  `train.head_warmup_iters` iterations the backbone is frozen (no gradient, no optimiser state, bit-identical
  weights) and the targets are Sinkhorn-Knopp-normalised; then the backbone unfreezes and trains with the
  layer-wise lr decay (`optim.layerwise_decay`) and `optim.backbone_lr_mult`. Fresh heads on an unfrozen
  backbone send large random gradients into it and destroy its features (dinov2 #204: kNN 80 % → 10 %).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from dino.distributed import is_main_process
from dino.errors import UserError
from dino.hub import (
    OFFICIAL_MODELS,
    describe_state_dict,
    extract_backbone_state_dict,
    load_checkpoint_file,
    what_file_holds,
)
from dino.log import get_logger
from dino.models import DINOV3_RELEASES, is_dinov3_state_dict

log = get_logger(__name__)


def _info(message: str) -> None:
    if is_main_process() and os.environ.get("RANK", "0") == "0":  # every rank reads the same file: say it once
        log.info(message)


HEAD_NAMES = ("dino_head", "ibot_head")
# the training config's head keys, read from a training checkpoint's saved config
HEAD_CONFIG_KEYS = (
    "dino.head_n_prototypes",
    "dino.head_hidden_dim",
    "dino.head_bottleneck_dim",
    "dino.head_nlayers",
    "dino.norm_last_layer",
    "dino.use_bn_in_head",
    "ibot.separate_head",
    "ibot.head_n_prototypes",
    "ibot.head_hidden_dim",
    "ibot.head_bottleneck_dim",
    "ibot.head_nlayers",
)
# our model.* keys ← the loader's inferred / stored kwargs
_MODEL_KEYS = {
    "arch": "arch",
    "patch_size": "patch_size",
    "depth": "depth",
    "embed_dim": "embed_dim",
    "img_size": "img_size",
    "init_values": "layerscale",
    "ffn_layer": "ffn_layer",
    "num_register_tokens": "num_register_tokens",
    "qkv_bias": "qkv_bias",
    "interpolate_offset": "interpolate_offset",
    "interpolate_antialias": "interpolate_antialias",
    "use_mask_token": "use_mask_token",
}


@dataclass
class StartingPoint:
    """What a backbone file holds, read once: the backbone tensors, its model kwargs and any heads."""

    source: str
    state_dict: dict[str, torch.Tensor]
    model_kwargs: dict[str, Any]  # v1/v2: the model.* values; v3: {} (the loader rebuilds it from the tensors)
    summary: str
    is_v3: bool = False
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # 'dino_head.*' / 'ibot_head.*' of a training ckpt
    head_config: dict[str, Any] = field(default_factory=dict)  # HEAD_CONFIG_KEYS from that checkpoint's config

    @property
    def has_heads(self) -> bool:
        return any(k.startswith("dino_head.") for k in self.heads)


def read_starting_point(source: str) -> StartingPoint:
    """Read a backbone file or hub name (downloads a release) without building anything yet."""
    source = str(source)
    if source in OFFICIAL_MODELS or source in DINOV3_RELEASES:
        from dino.hub import load_official

        state_dict = {k: v.detach() for k, v in load_official(source, pretrained=True).state_dict().items()}
        checkpoint: dict = {}
    else:
        checkpoint = load_checkpoint_file(os.path.expanduser(source), network="teacher")
        state_dict = extract_backbone_state_dict(checkpoint, "teacher")
    if any(key.startswith("lora.") for key in state_dict):
        raise UserError(
            f"{source} was trained with LoRA adapters (model.lora_rank); start from the run's "
            "teacher_backbone.safetensors instead, which has them merged into the weights"
        )
    heads: dict[str, torch.Tensor] = {}
    teacher = checkpoint.get("teacher") if isinstance(checkpoint, dict) else None
    if isinstance(teacher, dict):
        for key, value in teacher.items():
            key = key.removeprefix("module.")
            if isinstance(value, torch.Tensor) and key.startswith(tuple(n + "." for n in HEAD_NAMES)):
                heads[key] = value
    head_config: dict[str, Any] = {}
    if heads and isinstance(checkpoint.get("config"), str):
        saved = OmegaConf.create(checkpoint["config"])
        head_config = {
            key: OmegaConf.select(saved, key) for key in HEAD_CONFIG_KEYS if OmegaConf.select(saved, key) is not None
        }
    is_v3 = is_dinov3_state_dict(state_dict)
    model_kwargs: dict[str, Any] = {}
    if not is_v3:
        info = describe_state_dict(state_dict)
        stored = checkpoint.get("backbone_kwargs") if isinstance(checkpoint.get("backbone_kwargs"), dict) else None
        if not stored and not source.startswith(("http://", "https://")) and source not in OFFICIAL_MODELS:
            from dino.hub import _sidecar_kwargs

            stored = _sidecar_kwargs(os.path.expanduser(source))
        if source in OFFICIAL_MODELS:
            stored = dict(OFFICIAL_MODELS[source][1])
        merged = {k: info.get(k) for k in _MODEL_KEYS}
        merged.update({k: v for k, v in (stored or {}).items() if k in _MODEL_KEYS})
        if merged.get("arch") is None:
            raise UserError(
                f"{source} holds {what_file_holds(state_dict)}: a width that matches no named arch and no "
                "stored architecture; save it with dino.hub.save_backbone(model, path, model_kwargs)"
            )
        model_kwargs = {_MODEL_KEYS[k]: v for k, v in merged.items()}
    return StartingPoint(source, state_dict, model_kwargs, what_file_holds(state_dict), is_v3, heads, head_config)


def derive_config(cfg: DictConfig, point: StartingPoint, *, heads: bool = True) -> list[str]:
    """Set `cfg.model` (and, when the file brings heads, the head keys) to what the file holds.

    Returns the 'key: old → new' changes (also logged), so a run never trains an architecture other than the
    file's."""
    changes = []
    updates: dict[str, Any] = {}
    if point.is_v3:
        # the token grid the iBOT masks are drawn on: the patch size, or a ConvNeXt's stride-32 output
        weight = point.state_dict.get("patch_embed.proj.weight")
        updates["model.patch_size"] = int(weight.shape[-1]) if weight is not None else 32
    else:
        for key, value in point.model_kwargs.items():
            updates[f"model.{key}"] = value
        uses_ibot = float(cfg.ibot.loss_weight) > 0 and not str(OmegaConf.select(cfg, "distill.teacher") or "")
        if uses_ibot and not point.model_kwargs.get("use_mask_token", True):
            updates["model.use_mask_token"] = True  # DINO v1 releases have none: created fresh (iBOT needs it)
    if heads and point.has_heads:
        updates.update(point.head_config)
    with open_dict(cfg):
        for key, value in updates.items():
            old = OmegaConf.select(cfg, key)
            if old != value:
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)
                changes.append(f"{key}: {old} → {value}")
    if changes:
        _info(f"from {point.source}: " + ", ".join(changes))
    return changes


_CACHE: dict[str, StartingPoint] = {}


def prepare_config(cfg: DictConfig) -> StartingPoint | None:
    """`model.pretrained_weights` set: read the file once (kept for `train`) and make `cfg.model` follow it.
    Called by the command line before its config checks, and by `train` (a no-op the second time)."""
    source = str(OmegaConf.select(cfg, "model.pretrained_weights") or "")
    if not source:
        return None
    if source not in _CACHE:
        _CACHE[source] = read_starting_point(source)
    point = _CACHE[source]
    if point.is_v3 and "patch_embed.proj.weight" not in point.state_dict:
        raise UserError(
            f"{source} is a ConvNeXt ({point.summary}); the training loop trains ViT students only — "
            "use it as a --distill_from teacher, or start from a ViT"
        )
    derive_config(cfg, point)
    if point.is_v3 and str(cfg.train.parallel) == "fsdp":
        raise UserError(
            "continued pretraining of a DINOv3 file runs with --parallel ddp (the sharded teacher export "
            "rebuilds v1/v2 ViTs only)"
        )
    return point


def take_prepared(cfg: DictConfig) -> StartingPoint | None:
    """The starting point `prepare_config` read (and forget it: its tensors are copied into the networks)."""
    point = prepare_config(cfg)
    if point is not None:
        _CACHE.pop(point.source, None)
    return point


def build_pretrained_backbone(cfg: DictConfig, point: StartingPoint) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """The student backbone holding the file's weights; returns (backbone, backbone_kwargs, fresh keys)."""
    from dino.hub import build_backbone_from_state_dict
    from dino.train.meta_arch import build_student_backbone

    if point.is_v3:
        runtime = dict(drop_path_rate=float(cfg.model.drop_path_rate), attn_backend=str(cfg.model.attn_backend))
        backbone = build_backbone_from_state_dict(point.state_dict, None, None, **runtime)
        return backbone.to_empty(device="cpu") if _on_meta(backbone) else backbone, {}, []
    backbone, kwargs = build_student_backbone(cfg.model)
    result = backbone.load_state_dict(point.state_dict, strict=False)
    fresh = list(result.missing_keys)
    if result.unexpected_keys or any(key != "mask_token" for key in fresh):
        # derive_config made model.* follow the file, so only a hand-edited config ends here
        raise UserError(
            f"{point.source} does not fit model.* (missing {fresh[:4]}, unexpected "
            f"{list(result.unexpected_keys)[:4]}); it holds {point.summary}"
        )
    return backbone, kwargs, fresh


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def load_heads(network: nn.Module, heads: dict[str, torch.Tensor], source: str) -> None:
    """Copy a training checkpoint's head tensors into `network` (a `MultiCropNetwork`), strictly per head."""
    for name in HEAD_NAMES:
        module = getattr(network, name, None)
        # a feature-distillation projection (dino_head.feature_proj) belongs to the run that trained it
        wanted = {
            k[len(name) + 1 :]: v
            for k, v in heads.items()
            if k.startswith(name + ".") and not k.startswith(name + ".feature_proj.")
        }
        if module is None:
            continue
        if not wanted:
            raise UserError(f"{source} has no {name} weights, but this config uses one (ibot.separate_head)")
        own = {k: v for k, v in module.state_dict().items() if not k.startswith("feature_proj.")}
        bad = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in wanted.items()
            if k in own and v.shape != own[k].shape
        ]
        if bad or set(wanted) != set(own):
            raise UserError(
                f"the {name} of {source} does not fit this config's head ({', '.join(bad[:3]) or 'keys differ'});"
                " set the dino.head_* / ibot.head_* keys to the file's"
            )
        module.load_state_dict(wanted, strict=False)  # the keys were compared above (feature_proj aside)


def build_pretrained_networks(cfg: DictConfig, point: StartingPoint):
    """Student and teacher (copies of each other) from the file: backbone always, heads when the file has them.
    Logs what was loaded and what was initialised fresh."""
    from dino.train.meta_arch import build_networks

    backbone, kwargs, fresh = build_pretrained_backbone(cfg, point)
    student, teacher, _ = build_networks(cfg, backbone=backbone)
    loaded = [f"backbone ({point.summary})"]
    if point.has_heads:
        load_heads(student, point.heads, point.source)
        load_heads(teacher, point.heads, point.source)
        loaded.append("heads (" + ", ".join(n for n in HEAD_NAMES if getattr(student, n, None) is not None) + ")")
    else:
        fresh.extend(n for n in HEAD_NAMES if getattr(student, n, None) is not None)
    _info(f"loaded from {point.source}: {'; '.join(loaded)}; initialised fresh: {', '.join(fresh) or 'nothing'}")
    return student, teacher, kwargs


def head_warmup_iters(cfg: DictConfig, fresh_heads: bool | None, total_iters: int) -> int:
    """`train.head_warmup_iters`, or when null: 10 % of the run (≥ 1) when a pretrained backbone got fresh heads,
    0 otherwise (`fresh_heads` None: no --pretrained_weights)."""
    value = OmegaConf.select(cfg, "train.head_warmup_iters")
    if value is not None:
        if int(value) == 0 and fresh_heads:
            log.warning(
                "fresh heads on a pretrained backbone without a head warm-up (train.head_warmup_iters=0): "
                "their first gradients can wipe the backbone's features (dinov2 #204)"
            )
        return int(value)
    if not fresh_heads:
        return 0
    return max(1, total_iters // 10)


class HeadWarmup:
    """The backbone frozen for the first `iters` iterations (heads alone train, Sinkhorn-Knopp targets).

    `before_step(step)` is called before every step and sets the state from the step index alone, so a resumed
    run is in the same phase as an uninterrupted one. Frozen = `requires_grad` off: no graph through the
    backbone, no gradient, no AdamW state or weight decay for it, so its weights stay bit-identical (and the
    EMA teacher's backbone, a lerp between equal tensors, too). Under DDP the student is wrapped while
    everything requires grad (`find_unused_parameters` then covers the frozen phase).
    """

    def __init__(self, student: nn.Module, objective, iters: int):
        self.student, self.objective, self.iters = student, objective, int(iters)
        # with LoRA (dino.train.lora) the backbone stays frozen for good: the warm-up holds the adapters back
        adapters = getattr(student, "lora", None)
        self.params = list((adapters if adapters is not None else student.backbone).parameters())
        self.centering = objective.centering
        self.frozen: bool | None = None

    def before_step(self, step: int) -> None:
        frozen = step < self.iters
        if frozen == self.frozen:
            return
        for param in self.params:
            param.requires_grad_(not frozen)
        self.objective.centering = "sinkhorn_knopp" if frozen else self.centering
        if self.frozen is not None or step:
            _info(f"step {step}: backbone {'frozen (head warm-up)' if frozen else 'unfrozen'}")
        elif frozen:
            _info(
                f"head warm-up: backbone frozen for {self.iters} iterations, heads fitted with Sinkhorn-Knopp targets"
            )
        self.frozen = frozen

    def release(self) -> None:
        """Everything trainable again (before wrapping for DDP, and at the end)."""
        for param in self.params:
            param.requires_grad_(True)
        self.objective.centering = self.centering
        self.frozen = None
