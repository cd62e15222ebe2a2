"""PCA pictures of DINO / DINOv2 patch features, jointly over one or more images (the DINOv2 paper's figure).

Step 1 thresholds the first principal component of all patches to separate foreground from background
(sign fixed: the image borders are background); step 2 maps the first three principal components of the
foreground patches of all images to R, G, B, so matching object parts get matching colours.  Writes
`pca-grid.png` (inputs on top, maps below) and `pca-{i}.png` per image into --output_dir.
"""

from __future__ import annotations

import os
from typing import Sequence

from dino.config import ConfigCLI, Flag, bool_flag
from dino.distributed import DeviceContext
from dino.errors import UserError, require_path
from dino.eval.visualization import (
    backbone_flags,
    demo_image,
    image_to_tensor,
    load_backbone_for_visualization,
    make_grid,
    parse_image_size,
    patch_feature_grids,
    pca_feature_maps,
    pca_image,
    resize_to_patch_multiple,
)
from dino.log import get_logger

logger = get_logger(__name__)

CLI = ConfigCLI(
    description=__doc__,
    group="eval",
    default_config="visualize_pca",
    flags=[
        Flag(
            names=("--image_paths", "--image_path"),
            key="image_paths",
            nargs="+",
            metavar="PATH",
            help="one or more images (any format Pillow reads); empty: three generated demo pictures",
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
            names=("--fg_threshold",),
            key="fg_threshold",
            type=float,
            help="foreground = first principal component, scaled to [0, 1], above this value",
        ),
        Flag(
            names=("--remove_background",),
            key="remove_background",
            type=bool_flag,
            help="black out the background found by the first component (false: colour every patch)",
        ),
        Flag(names=("--output_dir",), key="output_dir", help="folder for the PNG files"),
    ],
    epilog="example:\n  dino visualize-pca --image_paths a.jpg b.jpg --pretrained_weights dinov2_vits14",
)


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Run the script; returns the paths written."""
    cfg, _ = CLI.parse(argv)
    image_size = parse_image_size(cfg.image_size)
    if not 0.0 <= float(cfg.fg_threshold) < 1.0:
        raise UserError(f"--fg_threshold is a level of the first component scaled to [0, 1]; got {cfg.fg_threshold}")
    if cfg.image_paths:
        from dino.data.datasets import load_image

        paths = [cfg.image_paths] if isinstance(cfg.image_paths, str) else list(cfg.image_paths)
        images = [load_image(require_path(p, "image", must_be_dir=False)) for p in paths]
    else:
        logger.info("no --image_paths given: using three generated demo pictures")
        paths = [f"demo-{seed}" for seed in range(3)]
        images = [demo_image(seed=seed) for seed in range(3)]
    device = DeviceContext.create(cfg.device).device
    model = load_backbone_for_visualization(cfg, device)

    images = [resize_to_patch_multiple(image, model.patch_size, image_size) for image in images]
    # one forward per image: sizes may differ when aspect ratios do
    grids = [patch_feature_grids(model, image_to_tensor(image).unsqueeze(0).to(device))[0].cpu() for image in images]
    maps = pca_feature_maps(grids, fg_threshold=float(cfg.fg_threshold), remove_background=bool(cfg.remove_background))
    pictures = [pca_image(rgb, image.size) for rgb, image in zip(maps.rgb, images)]
    for path, fg in zip(paths, maps.foreground):
        logger.info(f"{path}: {fg.shape[0]}x{fg.shape[1]} patches, {100.0 * fg.mean():.0f}% foreground")

    os.makedirs(cfg.output_dir, exist_ok=True)
    written = [os.path.join(cfg.output_dir, "pca-grid.png")]
    make_grid(images + pictures, columns=len(images)).save(written[0])
    for index, picture in enumerate(pictures):
        written.append(os.path.join(cfg.output_dir, f"pca-{index}.png"))
        picture.save(written[-1])
    for path in written:
        logger.info(f"wrote {path}")
    return written
