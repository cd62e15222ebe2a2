"""Save the last block's [CLS] attention of a DINO / DINOv2 backbone (registers excluded) as pictures.

Writes into --output_dir: `input.png` (the resized image), `attn-head{i}.png` (one heat map per head),
`attn-overlay-grid.png` (input, head mean and every head overlaid on the image), `patch-norms.png` (output
patch-token norms: high-norm outlier tokens of models without registers show as bright spots) and, with
--threshold, `attn-mask-head{i}.png` (the patches holding that fraction of each head's attention).
"""

from __future__ import annotations

import os
from typing import Sequence

from dino.config import ConfigCLI, Flag
from dino.distributed import DeviceContext
from dino.errors import require_path
from dino.eval.visualization import (
    MASK_COLORS,
    backbone_flags,
    check_keep_fraction,
    cls_attention_maps,
    demo_image,
    heatmap_image,
    image_to_tensor,
    load_backbone_for_visualization,
    make_grid,
    minmax_normalize,
    overlay,
    overlay_mask,
    parse_image_size,
    patch_token_norms,
    resize_to_patch_multiple,
    threshold_attention,
)
from dino.log import get_logger

logger = get_logger(__name__)

CLI = ConfigCLI(
    description=__doc__,
    group="eval",
    default_config="visualize_attention",
    flags=[
        Flag(
            names=("--image_path",),
            key="image_path",
            help="image to look at (any format Pillow reads); empty: a generated demo picture",
        ),
        *backbone_flags(),
        Flag(
            names=("--image_size",),
            key="image_size",
            type=int,
            nargs="+",
            metavar="SIZE",
            help="one int: shorter side; two: height width (rounded to multiples of the patch size)",
        ),
        Flag(
            names=("--threshold",),
            key="threshold",
            type=float,
            help="also save masks keeping this fraction of each head's attention mass (DINO uses 0.6)",
        ),
        Flag(names=("--output_dir",), key="output_dir", help="folder for the PNG files"),
    ],
    epilog="examples:\n"
    "  dino visualize-attention --image_path cat.jpg --pretrained_weights output/teacher_backbone.safetensors\n"
    "  dino visualize-attention --pretrained_weights dinov2_vits14_reg --image_size 448 --threshold 0.6",
)


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Run the script; returns the paths written."""
    cfg, _ = CLI.parse(argv)
    keep_fraction = check_keep_fraction(cfg.threshold)
    image_size = parse_image_size(cfg.image_size)
    if cfg.image_path:
        from dino.data.datasets import load_image

        image = load_image(require_path(cfg.image_path, "--image_path", must_be_dir=False))
    else:
        logger.info("no --image_path given: using a generated demo picture")
        image = demo_image()
    device = DeviceContext.create(cfg.device).device
    model = load_backbone_for_visualization(cfg, device)

    image = resize_to_patch_multiple(image, model.patch_size, image_size)
    pixels = image_to_tensor(image).unsqueeze(0).to(device)
    maps = cls_attention_maps(model, pixels)[0].cpu()  # (heads, h, w)
    norms = patch_token_norms(model, pixels)[0].cpu()
    logger.info(
        f"image {image.width}x{image.height} px, {maps.shape[1]}x{maps.shape[2]} patches, {maps.shape[0]} heads, "
        f"{model.num_register_tokens} register tokens (excluded)"
    )

    os.makedirs(cfg.output_dir, exist_ok=True)
    written: list[str] = []

    def save(picture, name: str) -> None:
        path = os.path.join(cfg.output_dir, name)
        picture.save(path)
        written.append(path)

    save(image, "input.png")
    for head, head_map in enumerate(maps):
        save(heatmap_image(head_map.numpy(), image.size), f"attn-head{head}.png")
    tiles = [image, overlay(image, minmax_normalize(maps.mean(0)).numpy())]
    tiles += [overlay(image, minmax_normalize(head_map).numpy()) for head_map in maps]
    save(make_grid(tiles, columns=min(len(tiles), 4)), "attn-overlay-grid.png")
    save(heatmap_image(norms.numpy(), image.size, colormap="inferno"), "patch-norms.png")
    if keep_fraction is not None:
        masks = threshold_attention(maps.flatten(1), keep_fraction).reshape(maps.shape)
        for head, mask in enumerate(masks):
            save(overlay_mask(image, mask.numpy(), MASK_COLORS[head % len(MASK_COLORS)]), f"attn-mask-head{head}.png")
    for path in written:
        logger.info(f"wrote {path}")
    return written
