"""Optimizer parameter groups: weight-decay exclusions, layer-wise lr decay and the head's last layer.

Each group carries multipliers instead of absolute values; `apply_schedules` turns the scheduled
lr / wd of the current iteration into per-group values (as DINOv2's ``apply_optim_scheduler``).

Layer-wise lr decay (BEiT / DINOv2 "layer_decay"): with n blocks, a parameter of layer id ℓ gets
``lr × decay^(n + 1 − ℓ)``, where ℓ = 0 for the patch embedding, tokens and position embedding, ℓ = i + 1
for ``blocks.i`` and ℓ = n + 1 for everything after the blocks (final norm, heads). The patch embedding
additionally gets ``patch_embed_lr_mult`` (0.2 in DINOv2).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

# Learned tokens and the position embedding: layer 0 for lr decay; weight-decayed as in the official code unless
# `exclude_tokens_from_weight_decay` (the config key `optim.exclude_tokens_from_weight_decay`).
TOKEN_NAMES = frozenset({"cls_token", "register_tokens", "mask_token", "pos_embed"})
# Wrapper prefixes that torch adds to parameter names (FSDP1, activation checkpointing, torch.compile).
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# `blocks.<chunk>.<block>.` (block_chunks > 0; block indices are global) or `blocks.<block>.`.
_CHUNKED_BLOCK = re.compile(r"(?:^|\.)blocks\.\d+\.(\d+)\.")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def clean_parameter_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def block_index(name: str) -> int | None:
    """The transformer block a parameter belongs to, from its (possibly prefixed or chunked) name."""
    match = _CHUNKED_BLOCK.search(name) or _BLOCK.search(name)
    return int(match.group(1)) if match else None


def count_blocks(model: nn.Module) -> int:
    """Number of transformer blocks: 1 + the largest block index among the model's parameter names."""
    indices = [block_index(clean_parameter_name(name)) for name, _ in model.named_parameters()]
    found = [index for index in indices if index is not None]
    return max(found) + 1 if found else 0


def layer_id(name: str, num_layers: int) -> int:
    """0 for patch_embed / tokens / pos_embed, i + 1 for blocks.i, num_layers + 1 for the rest."""
    parts = name.split(".")
    if "patch_embed" in parts or TOKEN_NAMES.intersection(parts):
        return 0
    index = block_index(name)
    return index + 1 if index is not None else num_layers + 1


def is_last_layer(name: str) -> bool:
    """The DINO / iBOT head's weight-normalised last layer (its lr follows the freeze schedule)."""
    return "last_layer" in name.split(".")


def weight_decay_multiplier(name: str, param: torch.Tensor, exclude_tokens: bool = False) -> float:
    """0 for biases, every ≤1-D parameter (norm weights, LayerScale ``gamma``), and, when `exclude_tokens`,
    the learned tokens and position embedding; 1 otherwise.

    Without `exclude_tokens` this is the official rule of both DINO v1 (every ``.bias`` and every 1-D tensor)
    and DINOv2 (``.bias``, names containing ``norm``, ``gamma``): cls_token (1,1,D), pos_embed (1,N,D),
    register_tokens (1,R,D) and mask_token (1,D) are decayed."""
    parts = name.split(".")
    if param.ndim <= 1 or parts[-1] == "bias" or "gamma" in parts:
        return 0.0
    if exclude_tokens and TOKEN_NAMES.intersection(parts):
        return 0.0
    return 1.0


def build_param_groups(
    model: nn.Module,
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    num_layers: int | None = None,
    exclude_tokens_from_weight_decay: bool = False,
    backbone_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """Optimizer param groups of `model`'s trainable parameters, one per distinct
    (lr_multiplier, wd_multiplier, is_last_layer), in order of first appearance.

    Each group is ``{"params", "lr_multiplier", "wd_multiplier", "is_last_layer", "names"}``; torch
    optimizers keep the extra keys, and `apply_schedules` reads them.

    Args:
        layerwise_decay: per-layer lr decay (DINOv2: 0.9 for S/B, 1.0 for L/g; DINO v1: 1.0).
        patch_embed_lr_mult: extra lr factor of the patch embedding (DINOv2: 0.2; v1: 1.0).
        num_layers: number of blocks; inferred from the parameter names when None.
        exclude_tokens_from_weight_decay: no weight decay on cls/register/mask tokens and pos_embed. Neither
            official code does this (DINO v1 exempts only biases and 1-D parameters, DINOv2 biases, norms and
            ``gamma``), so the default False reproduces them; True is what the demo preset was tuned with.
        backbone_lr_mult: extra lr factor of every ``backbone.*`` parameter of a student network (continued
            pretraining from a released model: a lower lr for the pretrained backbone than for the fresh heads);
            it multiplies the layer-wise factor.
    """
    if num_layers is None:
        num_layers = count_blocks(model)
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = clean_parameter_name(raw_name)
        lr_multiplier = layerwise_decay ** (num_layers + 1 - layer_id(name, num_layers))
        if "patch_embed" in name.split("."):
            lr_multiplier *= patch_embed_lr_mult
        if backbone_lr_mult != 1.0 and name.split(".", 1)[0] == "backbone":
            lr_multiplier *= backbone_lr_mult
        wd_multiplier = weight_decay_multiplier(name, param, exclude_tokens_from_weight_decay)
        last_layer = is_last_layer(name)
        key = (lr_multiplier, wd_multiplier, last_layer)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "lr_multiplier": lr_multiplier,
                "wd_multiplier": wd_multiplier,
                "is_last_layer": last_layer,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set every group's ``lr = (last_layer_lr if is_last_layer else lr) × lr_multiplier`` and
    ``weight_decay = wd × wd_multiplier`` (groups without multipliers count as 1)."""
    for group in optimizer.param_groups:
        scheduled_lr = last_layer_lr if group.get("is_last_layer", False) else lr
        group["lr"] = scheduled_lr * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)
