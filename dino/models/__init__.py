"""Backbones and heads. Models take tensors and return tensors; they know nothing of devices or training."""

from __future__ import annotations

from dino.errors import UserError, suggest
from dino.models.convnext import ConvNeXt
from dino.models.dinov3 import DINOV3_RELEASES, build_dinov3, describe_dinov3_state_dict, is_dinov3_state_dict
from dino.models.head import DINOHead, WeightNormLinear
from dino.models.vision_transformer import (
    ARCH_SIZES,
    ATTENTION_BACKENDS,
    V3_ARCH_SIZES,
    Attention,
    Block,
    DinoV3VisionTransformer,
    VisionTransformer,
    ViTBackbone,
    dinov3_vision_transformer,
    split_tokens,
    vision_transformer,
    xformers_available,
)

ARCH_CHOICES = tuple(ARCH_SIZES)


def build_backbone(arch: str = "vit_small", patch_size: int = 16, **kwargs) -> VisionTransformer:
    """A ViT of a named size (`vit_tiny|vit_small|vit_base|vit_large|vit_giant2`); kwargs go to `VisionTransformer`."""
    if arch not in ARCH_SIZES:
        raise UserError(
            f"unknown arch {arch!r}." + suggest(arch, ARCH_SIZES) + f" Choose one of: {', '.join(ARCH_SIZES)}"
        )
    if int(patch_size) <= 0:
        raise UserError(f"patch size must be positive, got {patch_size}")
    return vision_transformer(arch, patch_size=int(patch_size), **kwargs)


__all__ = [
    "ARCH_CHOICES",
    "ARCH_SIZES",
    "ATTENTION_BACKENDS",
    "Attention",
    "Block",
    "ConvNeXt",
    "DINOHead",
    "DINOV3_RELEASES",
    "DinoV3VisionTransformer",
    "V3_ARCH_SIZES",
    "ViTBackbone",
    "VisionTransformer",
    "WeightNormLinear",
    "build_backbone",
    "build_dinov3",
    "describe_dinov3_state_dict",
    "dinov3_vision_transformer",
    "is_dinov3_state_dict",
    "split_tokens",
    "vision_transformer",
    "xformers_available",
]
