"""torch.hub entry points: `torch.hub.load('<this repo>', 'dinov2_vits14', source='local', pretrained=False)`."""

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
)
