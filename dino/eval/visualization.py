"""Pictures of what a ViT learned: [CLS] attention maps, thresholded attention masks, PCA patch-feature maps.

Model-facing functions take a `VisionTransformer` and a batch of normalised images (B, 3, H, W) whose sides
are multiples of the patch size; they never change the model's device or mode (the tensorboard helpers put
the model in eval mode for the duration of the call and restore it).  Everything else is numpy / Pillow:
colour maps, overlays and image grids are drawn without matplotlib.

Token layout of our models (and the official v1 / v2 / v2-with-registers models): [CLS, registers…, patches…].
Register tokens are always dropped from the maps; patch tokens are in row-major order over an (H/p, W/p) grid.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from dino.config import Flag, bool_flag
from dino.data.transforms import IMAGENET_MEAN, IMAGENET_STD, make_normalize
from dino.errors import UserError
from dino.models.vision_transformer import split_tokens

RGB = tuple[int, int, int]
ImageSize = int | tuple[int, int] | None  # shorter side, (height, width), or keep the image's size

# Colour maps as evenly spaced anchor colours, linearly interpolated (samples of matplotlib's maps).
COLORMAPS: dict[str, tuple[RGB, ...]] = {
    "viridis": (
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ),
    "inferno": (
        (0, 0, 4),
        (31, 12, 72),
        (85, 15, 109),
        (136, 34, 106),
        (186, 54, 85),
        (227, 89, 51),
        (249, 140, 10),
        (249, 201, 50),
        (252, 255, 164),
    ),
    "jet": (
        (0, 0, 128),
        (0, 0, 255),
        (0, 128, 255),
        (0, 255, 255),
        (128, 255, 128),
        (255, 255, 0),
        (255, 128, 0),
        (255, 0, 0),
        (128, 0, 0),
    ),
    "gray": ((0, 0, 0), (255, 255, 255)),
}
MASK_COLORS: tuple[RGB, ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)


# ----------------------------------------------------------------------------------------- model → maps


def _patch_grid(model: torch.nn.Module, images: Tensor) -> tuple[int, int]:
    """(h, w): the patch grid of a batch, with a clear error when the sides are not patch multiples."""
    height, width = images.shape[-2:]
    patch = model.patch_size
    if height % patch or width % patch:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the patch size {patch}; "
            "resize with resize_to_patch_multiple first"
        )
    return height // patch, width // patch


@torch.no_grad()
def cls_attention_maps(model: torch.nn.Module, images: Tensor) -> Tensor:
    """[CLS]→patch attention of the last block, (B, heads, h, w) with h = H/p, w = W/p.

    The values are the softmax weights themselves (not renormalised): register tokens and the [CLS]
    token's attention to itself are dropped, so a head's map sums to at most 1.
    """
    h, w = _patch_grid(model, images)
    attention = model.get_last_selfattention(images)  # (B, heads, T, T)
    first_patch = 1 + model.num_register_tokens
    cls_to_patches = attention[:, :, 0, first_patch:]
    if cls_to_patches.shape[-1] != h * w:
        raise RuntimeError(f"model returned {cls_to_patches.shape[-1]} patch tokens for a {h}x{w} grid")
    return cls_to_patches.reshape(*cls_to_patches.shape[:2], h, w).float()


@torch.no_grad()
def patch_feature_grids(model: torch.nn.Module, images: Tensor) -> list[Tensor]:
    """Normalised output patch tokens of each image as an (h, w, D) grid (registers excluded)."""
    h, w = _patch_grid(model, images)
    tokens = model.forward_features(images)["x_norm_patchtokens"].float()
    return list(tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).unbind(0))


@torch.no_grad()
def patch_token_norms(model: torch.nn.Module, images: Tensor) -> Tensor:
    """L2 norm of each output patch token before the final LayerNorm, (B, h, w).

    High-norm outlier tokens (Darcet et al., "Vision Transformers Need Registers") show up as isolated
    bright patches in models trained without registers; the final LayerNorm would hide them, hence prenorm.
    """
    h, w = _patch_grid(model, images)
    prenorm = model.forward_features(images)["x_prenorm"]
    patches = split_tokens(prenorm, model.num_register_tokens)[2].float()
    return patches.norm(dim=-1).reshape(-1, h, w)


# ----------------------------------------------------------------------------------------- map algebra


def threshold_attention(attention: Tensor, keep_fraction: float) -> Tensor:
    """Boolean masks keeping, per row, the smallest set of patches that holds `keep_fraction` of the mass.

    attention: (..., N) non-negative weights (e.g. (heads, N)); each row is normalised to sum to 1 first,
    so the raw [CLS]→patch weights can be passed directly.  Patches are taken in decreasing order of
    weight until the kept mass reaches `keep_fraction` (DINO v1's visualisation): kept mass ≥ fraction,
    and dropping the smallest kept patch would fall below it.  Ties are broken by patch index.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    # float64 on the CPU: exact enough for the cumulative sums, and available on every backend (not MPS)
    mass = attention.detach().cpu().double().clamp_min(0.0)
    mass = mass / mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    sorted_mass, order = mass.sort(dim=-1, descending=True, stable=True)
    # a patch is kept while the mass of the (larger) patches before it is still short of the target
    cumulative = torch.cumsum(sorted_mass, dim=-1)
    mass_before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
    keep_sorted = mass_before < keep_fraction
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted).to(attention.device)


def head_mean_heatmaps(maps: Tensor, keep_fraction: float | None = None) -> Tensor:
    """One (h, w) heat map per image from (B, heads, h, w) attention, scaled to [0, 1] per image.

    Without `keep_fraction`: the mean over heads.  With it: the fraction of heads whose thresholded mask
    covers each patch (the video visualisation of DINO v1).
    """
    if keep_fraction is not None:
        masks = threshold_attention(maps.flatten(-2), keep_fraction).reshape(maps.shape)
        return masks.float().mean(dim=1)
    return minmax_normalize(maps.float().mean(dim=1), dims=(-2, -1))


def minmax_normalize(values: Tensor, dims: tuple[int, ...] = (-2, -1)) -> Tensor:
    """Scale to [0, 1] over `dims`; a constant input becomes all zeros."""
    low = values.amin(dim=dims, keepdim=True)
    span = values.amax(dim=dims, keepdim=True) - low
    return torch.where(span > 0, (values - low) / span.clamp_min(1e-12), torch.zeros_like(values))


# ----------------------------------------------------------------------------------------- PCA maps


@dataclass
class PCAFeatureMaps:
    """Result of `pca_feature_maps`, one entry per input image.

    rgb: (h, w, 3) float32 in [0, 1]; background patches are black.
    foreground: (h, w) bool, the patches kept by the first-component threshold.
    first_component: (h, w) float32 in [0, 1], oriented so that foreground scores high.
    """

    rgb: list[np.ndarray]
    foreground: list[np.ndarray]
    first_component: list[np.ndarray]


def principal_components(features: Tensor, num_components: int) -> tuple[Tensor, Tensor]:
    """(mean (D,), components (k, D)) of the rows of `features` (N, D), by eigendecomposition of the covariance.

    Each component's sign is fixed so that its largest-magnitude loading is positive, making the result
    independent of the eigen-solver.  Fewer than `num_components` dimensions are padded with zero rows.
    """
    features = features.detach().cpu().double()
    mean = features.mean(dim=0)
    centred = features - mean
    covariance = centred.T @ centred / max(features.shape[0] - 1, 1)
    _, eigenvectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    components = eigenvectors.flip(-1).T[:num_components]
    largest = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
    components = components * torch.where(largest < 0, -1.0, 1.0).to(components)
    if components.shape[0] < num_components:
        padding = components.new_zeros(num_components - components.shape[0], components.shape[1])
        components = torch.cat([components, padding])
    return mean, components


def _border_mask(height: int, width: int) -> Tensor:
    border = torch.zeros(height, width, dtype=torch.bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    return border


def pca_feature_maps(
    patch_features: Sequence[Tensor | np.ndarray], fg_threshold: float = 0.5, remove_background: bool = True
) -> PCAFeatureMaps:
    """The two-step PCA picture of the DINOv2 paper, jointly over several images.

    patch_features: one (h_i, w_i, D) grid of patch features per image (grids may differ in size).

    1. Foreground: project all patches of all images on their first principal component, scale the
       scores to [0, 1] (min-max over all images) and call a patch foreground when its score is above
       `fg_threshold`.  The component's sign is arbitrary (dinov2 #292), so we fix it: **the border patches
       of the images (first / last row and column) must score on average no higher than all patches do**,
       i.e. objects are assumed to lie inside the frame rather than along its edges.
    2. Colour: a 3-component PCA fitted on the foreground patches of all images together, each component
       min-max scaled to [0, 1] over those patches and used as R, G, B; background patches are black.
       Components' signs follow `principal_components`.

    With `remove_background=False` step 1 is skipped and every patch is coloured.
    """
    grids = [
        (g if isinstance(g, Tensor) else torch.from_numpy(np.asarray(g))).detach().cpu().double()
        for g in patch_features
    ]
    if not grids:
        raise ValueError("pca_feature_maps needs at least one feature grid")
    shapes = [tuple(g.shape[:2]) for g in grids]
    if any(g.dim() != 3 or g.shape[-1] != grids[0].shape[-1] for g in grids):
        raise ValueError(f"expected (h, w, D) grids with one D, got shapes {[tuple(g.shape) for g in grids]}")
    features = torch.cat([g.reshape(-1, g.shape[-1]) for g in grids])
    border = torch.cat([_border_mask(h, w).flatten() for h, w in shapes])

    mean, components = principal_components(features, 1)
    scores = (features - mean) @ components[0]
    if scores[border].mean() > scores.mean():
        scores = -scores
    first = minmax_normalize(scores, dims=(0,))
    foreground = first > fg_threshold if remove_background else torch.ones_like(first, dtype=torch.bool)

    rgb = torch.zeros(features.shape[0], 3, dtype=torch.float64)
    if int(foreground.sum()) >= 2:
        fg_features = features[foreground]
        fg_mean, fg_components = principal_components(fg_features, 3)
        rgb[foreground] = minmax_normalize((fg_features - fg_mean) @ fg_components.T, dims=(0,))

    sizes = [h * w for h, w in shapes]
    return PCAFeatureMaps(
        rgb=[c.reshape(h, w, 3).float().numpy() for c, (h, w) in zip(rgb.split(sizes), shapes)],
        foreground=[m.reshape(h, w).numpy() for m, (h, w) in zip(foreground.split(sizes), shapes)],
        first_component=[s.reshape(h, w).float().numpy() for s, (h, w) in zip(first.split(sizes), shapes)],
    )


# ----------------------------------------------------------------------------------------- images


def target_size(width: int, height: int, patch_size: int, size: ImageSize = None) -> tuple[int, int]:
    """(width, height) after resizing to `size` and rounding each side to the nearest patch multiple (≥ 1 patch).

    size: None keeps the image's size, an int sets the shorter side (aspect ratio kept), (H, W) is exact.
    """
    if size is None:
        new_w, new_h = float(width), float(height)
    elif isinstance(size, int):
        scale = size / min(width, height)
        new_w, new_h = width * scale, height * scale
    else:
        new_h, new_w = float(size[0]), float(size[1])
    rounded = [max(patch_size, int(round(side / patch_size)) * patch_size) for side in (new_w, new_h)]
    return rounded[0], rounded[1]


def resize_to_patch_multiple(image: Image.Image, patch_size: int, size: ImageSize = None) -> Image.Image:
    """Resize (bicubic) so that both sides are multiples of the patch size; see `target_size` for `size`."""
    new_size = target_size(image.width, image.height, patch_size, size)
    return image if new_size == image.size else image.resize(new_size, Image.BICUBIC)


def parse_image_size(value: Sequence[int] | int | None, what: str = "--image_size") -> ImageSize:
    """A config value (null, one int, or [H, W]) as an `ImageSize`; anything else is a UserError."""
    if value is None:
        return None
    values = [value] if isinstance(value, int) else list(value)
    if len(values) not in (1, 2) or any(int(v) <= 0 for v in values):
        raise UserError(f"{what} takes one positive int (shorter side) or two (height width), got {values}")
    return int(values[0]) if len(values) == 1 else (int(values[0]), int(values[1]))


def image_to_tensor(image: Image.Image) -> Tensor:
    """PIL RGB → (3, H, W) float tensor normalised with the ImageNet mean and std."""
    return make_normalize()(image.convert("RGB"))


def tensor_to_image(
    image: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Image.Image:
    """Inverse of `image_to_tensor`: a normalised (3, H, W) tensor back to a PIL RGB image."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), mode="RGB")


def colorize(
    values: np.ndarray | Tensor, colormap: str = "viridis", vmin: float | None = None, vmax: float | None = None
) -> Image.Image:
    """A 2-D array as a PIL RGB image through a colour map; values are scaled from [vmin, vmax] (default: min, max)."""
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; choose from {', '.join(COLORMAPS)}")
    array = np.nan_to_num(np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64))
    if array.ndim != 2:
        raise ValueError(f"colorize takes a 2-D array, got shape {array.shape}")
    low = float(array.min()) if vmin is None else vmin
    high = float(array.max()) if vmax is None else vmax
    unit = np.clip((array - low) / (high - low), 0, 1) if high > low else np.zeros_like(array)
    anchors = np.asarray(COLORMAPS[colormap], dtype=np.float64)
    positions = np.linspace(0, 1, len(anchors))
    channels = [np.interp(unit, positions, anchors[:, c]) for c in range(3)]
    return Image.fromarray(np.stack(channels, axis=-1).round().astype(np.uint8), mode="RGB")


def _resize_map_image(picture: Image.Image, size: tuple[int, int], smooth: bool) -> Image.Image:
    return picture if picture.size == size else picture.resize(size, Image.BILINEAR if smooth else Image.NEAREST)


def heatmap_image(
    values: np.ndarray | Tensor, size: tuple[int, int] | None = None, colormap: str = "viridis", smooth: bool = False
) -> Image.Image:
    """Colourised (h, w) map resized to `size` (width, height); patch blocks stay sharp unless `smooth`."""
    picture = colorize(values, colormap)
    return picture if size is None else _resize_map_image(picture, size, smooth)


def overlay(
    image: Image.Image, values: np.ndarray | Tensor, alpha: float = 0.5, colormap: str = "jet", smooth: bool = False
) -> Image.Image:
    """Blend a colourised (h, w) map, resized to the image, over the image (`alpha` = weight of the map)."""
    colored = heatmap_image(values, image.size, colormap, smooth)
    return Image.blend(image.convert("RGB"), colored, alpha)


def overlay_mask(
    image: Image.Image, mask: np.ndarray | Tensor, color: RGB = MASK_COLORS[0], alpha: float = 0.5
) -> Image.Image:
    """Tint the pixels of a (h, w) boolean mask (resized to the image) with `color` and outline its contour."""
    mask_array = np.asarray(mask.detach().cpu() if isinstance(mask, Tensor) else mask, dtype=bool)
    mask_image = Image.fromarray(mask_array.astype(np.uint8) * 255, mode="L").resize(image.size, Image.NEAREST)
    inside = np.asarray(mask_image) > 0
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64).copy()
    tint = np.asarray(color, dtype=np.float64)
    pixels[inside] = (1 - alpha) * pixels[inside] + alpha * tint
    # contour: mask pixels with a 4-neighbour outside the mask
    padded = np.pad(inside, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    pixels[inside & ~interior] = tint
    return Image.fromarray(pixels.round().astype(np.uint8), mode="RGB")


def make_grid(
    images: Sequence[Image.Image], columns: int | None = None, padding: int = 4, background: RGB = (255, 255, 255)
) -> Image.Image:
    """Tile images row by row (`columns` per row, default all in one row); cells take the largest image's size."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = max(1, min(columns or len(images), len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    grid = Image.new(
        "RGB", (columns * cell_w + (columns + 1) * padding, rows * cell_h + (rows + 1) * padding), background
    )
    for index, im in enumerate(images):
        row, col = divmod(index, columns)
        x = padding + col * (cell_w + padding) + (cell_w - im.width) // 2
        y = padding + row * (cell_h + padding) + (cell_h - im.height) // 2
        grid.paste(im.convert("RGB"), (x, y))
    return grid


def pca_image(rgb: np.ndarray, size: tuple[int, int] | None = None) -> Image.Image:
    """An (h, w, 3) map in [0, 1] as a PIL image, resized (nearest: one block per patch) to `size` (width, height)."""
    picture = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), mode="RGB")
    return picture if size is None else _resize_map_image(picture, size, smooth=False)


def demo_image(size: tuple[int, int] = (224, 320), seed: int = 0) -> Image.Image:
    """A procedural test picture, (height, width): a disc, a striped box and a triangle on a textured backdrop.

    Deterministic in `seed` (which moves and recolours the objects); used when no image is given.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    scale = 2  # draw at twice the size and downsample: anti-aliased edges without extra code
    H, W = height * scale, width * scale
    ys, xs = np.mgrid[0:H, 0:W] / np.array([H, W]).reshape(2, 1, 1)
    top, bottom = rng.uniform(0.55, 0.9, 3), rng.uniform(0.2, 0.5, 3)
    backdrop = top * (1 - ys[..., None]) + bottom * ys[..., None]
    backdrop += 0.04 * np.sin(40 * xs + 25 * ys)[..., None] + rng.normal(0, 0.03, (H, W, 1))
    picture = Image.fromarray((np.clip(backdrop, 0, 1) * 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(picture)
    unit = min(H, W)

    def colour() -> RGB:
        return tuple(int(c) for c in rng.integers(0, 256, 3))

    cx, cy, r = W * rng.uniform(0.2, 0.35), H * rng.uniform(0.3, 0.6), unit * rng.uniform(0.14, 0.2)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour())
    x0, y0 = W * rng.uniform(0.45, 0.55), H * rng.uniform(0.15, 0.3)
    bw, bh = unit * rng.uniform(0.25, 0.35), unit * rng.uniform(0.25, 0.35)
    stripe_a, stripe_b = colour(), colour()
    stripes = max(3, int(bw // (unit * 0.05)))
    for i in range(stripes):
        draw.rectangle(
            (x0 + i * bw / stripes, y0, x0 + (i + 1) * bw / stripes, y0 + bh), fill=stripe_a if i % 2 else stripe_b
        )
    tx, ty, ts = W * rng.uniform(0.7, 0.8), H * rng.uniform(0.55, 0.75), unit * rng.uniform(0.15, 0.22)
    draw.polygon([(tx, ty - ts), (tx - ts, ty + ts * 0.8), (tx + ts, ty + ts * 0.8)], fill=colour())
    return picture.resize((width, height), Image.LANCZOS)


# ----------------------------------------------------------------------------------------- tensorboard


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration of the block, restoring the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _to_chw_uint8(picture: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(picture.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def attention_figure_for_tensorboard(
    model: torch.nn.Module,
    images: Tensor,
    max_heads: int | None = 6,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """One picture of the last block's [CLS] attention for `SummaryWriter.add_image(tag, figure, step)`.

    model: the backbone (a DistributedDataParallel wrapper is unwrapped).
    images: (B, 3, H, W) normalised, sides multiples of the patch size.
    One row per image: the input, the head-mean attention overlaid on it, then the first `max_heads` heads
    (all when None), each min-max scaled.  Returns a (3, H', W') uint8 tensor (CHW, add_image's default).
    """
    model = _unwrap(model)
    with _evaluating(model):
        maps = cls_attention_maps(model, images.to(_model_device(model))).cpu()
    heads = maps.shape[1] if max_heads is None else min(max_heads, maps.shape[1])
    tiles: list[Image.Image] = []
    for image, image_maps in zip(images, maps):
        picture = tensor_to_image(image, mean, std)
        tiles.append(picture)
        tiles.append(overlay(picture, minmax_normalize(image_maps.mean(0)).numpy()))
        tiles.extend(heatmap_image(image_maps[h].numpy(), picture.size) for h in range(heads))
    return _to_chw_uint8(make_grid(tiles, columns=heads + 2, padding=2))


def pca_figure_for_tensorboard(
    model: torch.nn.Module,
    images: Tensor,
    fg_threshold: float = 0.5,
    remove_background: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """The joint PCA feature maps of a batch for `SummaryWriter.add_image(tag, figure, step)`.

    Top row: the inputs; bottom row: `pca_feature_maps` of their patch features, one block per patch.
    Returns a (3, H', W') uint8 tensor (CHW).
    """
    model = _unwrap(model)
    with _evaluating(model):
        grids = patch_feature_grids(model, images.to(_model_device(model)))
    maps = pca_feature_maps([g.cpu() for g in grids], fg_threshold, remove_background)
    inputs = [tensor_to_image(image, mean, std) for image in images]
    coloured = [pca_image(rgb, picture.size) for rgb, picture in zip(maps.rgb, inputs)]
    return _to_chw_uint8(make_grid(inputs + coloured, columns=len(inputs), padding=2))


# ----------------------------------------------------------------------------------------- CLI support


def backbone_flags() -> list[Flag]:
    """The flags every visualisation script shares to pick a backbone and a device."""
    return [
        Flag(
            names=("--pretrained_weights",),
            key="pretrained_weights",
            help="checkpoint file (ours or official), URL or hub name (e.g. dinov2_vits14_reg); "
            "empty: download the official weights for --arch / --patch_size",
        ),
        Flag(
            names=("--arch",), key="arch", help="ViT size; empty: read from the checkpoint (vit_small for the download)"
        ),
        Flag(
            names=("--patch_size",),
            key="patch_size",
            type=int,
            help="patch size; empty: read from the checkpoint (16 for the download)",
        ),
        Flag(
            names=("--num_register_tokens",),
            key="num_register_tokens",
            type=int,
            help="register tokens; empty: read from the checkpoint (0 for the download)",
        ),
        Flag(
            names=("--checkpoint_key",),
            key="checkpoint_key",
            help="which weights of a training checkpoint (teacher or student)",
        ),
        Flag(
            names=("--allow_pickle",),
            key="allow_pickle",
            type=bool_flag,
            help="allow checkpoints holding pickled Python objects (only for files you trust)",
        ),
        Flag(names=("--device",), key="device", help="auto, cuda, hpu, mps or cpu"),
    ]


def load_backbone_for_visualization(cfg, device: torch.device) -> torch.nn.Module:
    """The eval-mode backbone a visualisation config names (see `backbone_flags`), on `device`."""
    from dino.hub import resolve_backbone

    model = resolve_backbone(
        cfg.pretrained_weights or None,
        arch=cfg.arch or None,
        patch_size=cfg.patch_size,
        checkpoint_key=cfg.checkpoint_key,
        num_register_tokens=cfg.num_register_tokens,
        allow_pickle=bool(cfg.allow_pickle),
    )
    return model.to(device).eval()


def check_keep_fraction(value: float | None, what: str = "--threshold") -> float | None:
    """None, or a fraction in (0, 1]; anything else is a UserError."""
    if value is None:
        return None
    if not 0.0 < float(value) <= 1.0:
        raise UserError(f"{what} is the fraction of attention mass to keep, in (0, 1]; got {value}")
    return float(value)
