"""torch.hub entry points: `torch.hub.load('<this repo>', 'dinov2_vits14', source='local', pretrained=False)`.

DINO v1, DINOv2 (+ registers) and DINOv3 (ViTs and ConvNeXt students), e.g. 'dinov3_vits16' with
`pretrained=True`, `weights='LVD1689M' | 'SAT493M' | PATH | URL` or `pretrained=False`.
"""

dependencies = ["torch"]

from dino.hub import (  # noqa: E402,F401
    dino_vitb8,
    dino_vitb16,
    dino_vits8,
    dino_vits16,
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
    dinov3_convnext_base,
    dinov3_convnext_large,
    dinov3_convnext_small,
    dinov3_convnext_tiny,
    dinov3_vit7b16,
    dinov3_vitb16,
    dinov3_vith16plus,
    dinov3_vitl16,
    dinov3_vitl16plus,
    dinov3_vits16,
    dinov3_vits16plus,
)
