"""ONNX export of a backbone's features, verified with onnxruntime when it is installed.

The graph takes normalised images (batch, 3, H, W) and returns `cls` (batch, D) and `patch_tokens`
(batch, H/p · W/p, D), both after the final LayerNorm.  The batch size and, by default, the image height and
width are dynamic: any H, W that are multiples of the patch size p.

The position embedding is resized inside the graph for the input's size, exactly as
`VisionTransformer.interpolate_pos_encoding` does it, but without an ONNX `Resize`: exporting the bicubic
`F.interpolate` gives a `Resize` whose cubic kernel onnxruntime evaluates differently from PyTorch (optimum
PR #1580, transformers #26790), so the features would silently drift.  A separable bicubic resize is linear in
the grid, one matrix per axis: resized = A_h · grid · A_wᵀ with A_h of shape (H/p, M) and A_w (W/p, M) for the
stored M×M grid.  `bicubic_resize_matrix` computes those matrices from the output size with plain ops
(arange, floor, clamp, comparisons, arithmetic), so they follow the input's size in the graph and reproduce
PyTorch's kernels to float rounding:

- `interpolate_offset` > 0 (DINO v1, the DINOv2 hub models): `scale_factor` = (n + offset)/M, source
  coordinate (i + ½)·M/(n + offset) − ½, Keys' cubic kernel with A = −0.75 on the four taps around it,
  indices clamped to the border;
- `interpolate_offset` = 0 (the DINOv2 register models): `size` = n, source coordinate (i + ½)·M/n − ½ with the
  same four taps, or with `interpolate_antialias` PyTorch's antialiased (PIL-like) kernel: a = −0.5, support
  2·max(M/n, 1), weights renormalised over the window inside the grid (an axis whose size stays M is copied);
- the grid is used as stored when H/p = W/p = M (the model skips the interpolation then, even with an offset).

The matrices are tiny (n × M), so the resize costs next to nothing; the products are `Einsum` nodes, which
`quantize_onnx_int8` (MatMul / Gemm only) leaves in fp32.  `export_onnx(..., dynamic_size=False)` still writes
the older graph for one fixed image size, with the interpolated embedding stored as a constant.

DINOv3 ViTs have no position embedding to resize: their rotary tables are computed in the graph from the input's
size (`RopePositionEmbedding`'s arange / sin / cos, traced), through the same `InferenceViT` blocks; sizes that are
not multiples of 16 are floored, as the model does. The DINOv3 ConvNeXts are traced through their own forward.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dino.errors import UserError
from dino.inference.fast import InferenceViT
from dino.models.vision_transformer import VisionTransformer


def _cubic1(x: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel on |x| ≤ 1."""
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic2(x: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel on 1 < |x| < 2."""
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def bicubic_resize_matrix(out_size, in_size: int, offset: float = 0.0, antialias: bool = False) -> Tensor:
    """(out_size, in_size) float32 matrix R with R @ x = 1-D bicubic resize of x (length in_size) to out_size.

    As `VisionTransformer.interpolate_pos_encoding` calls `F.interpolate(mode="bicubic", align_corners=False)`
    along one axis: with `offset` > 0 through `scale_factor=(out_size + offset) / in_size`, with offset 0
    through `size=out_size`; `antialias` picks PyTorch's antialiased kernel.  `out_size` may be a traced size
    (the ONNX export follows the input's size); everything is built from arange, floor, clamp, comparisons
    and arithmetic, which export to plain ONNX ops.
    """
    dst = torch.arange(out_size, dtype=torch.float32)
    src = torch.arange(in_size, dtype=torch.float32)
    n = torch.ones((), dtype=torch.float64) * out_size
    # input/output ratio as PyTorch's kernels get it: 1/scale_factor (scale_factor in double), else in/out in fp32
    if offset:
        ratio = (1.0 / ((n + offset) / in_size)).float()
    else:
        ratio = torch.full((), float(in_size)) / n.float()
    if antialias:  # _upsample_bicubic2d_aa: PIL's bounds and weights, renormalised over the window
        downscale = ratio >= 1
        support = torch.where(downscale, 2 * ratio, torch.full((), 2.0))
        invscale = torch.where(downscale, 1 / ratio, torch.ones(()))
        center = ratio * (dst + 0.5)
        xmin = torch.clamp(torch.floor(center - support + 0.5), min=0)
        xmax = torch.clamp(torch.floor(center + support + 0.5), max=float(in_size))
        x = torch.abs((src[None, :] - center[:, None] + 0.5) * invscale)
        weights = torch.where(x < 1, _cubic1(x, -0.5), torch.where(x < 2, _cubic2(x, -0.5), torch.zeros(())))
        inside = (src[None, :] >= xmin[:, None]) & (src[None, :] < xmax[:, None])
        weights = weights * inside.float()
        weights = weights / weights.sum(dim=1, keepdim=True)
        # the antialiased kernel copies an axis whose size does not change, whatever the scale factor says
        same = (dst[:, None] == src[None, :]).float()
        return torch.where(n.float() == float(in_size), same, weights)
    # upsample_bicubic2d: source coordinate ratio·(i + ½) − ½ (not clamped at 0 for cubic), four taps around
    # floor(coordinate) with indices clamped to the grid, A = −0.75
    real = ratio * (dst + 0.5) - 0.5
    x0 = torch.clamp(torch.floor(real), max=float(in_size - 1))
    t = torch.clamp(real - x0, 0.0, 1.0)
    taps = (_cubic2(t + 1, -0.75), _cubic1(t, -0.75), _cubic1(1 - t, -0.75), _cubic2(2 - t, -0.75))
    matrix = torch.zeros(())
    for k, weight in enumerate(taps):
        index = torch.clamp(x0 + (k - 1), 0.0, float(in_size - 1))
        matrix = matrix + weight[:, None] * (index[:, None] == src[None, :]).float()
    return matrix


def resize_position_grid(grid: Tensor, height, width, offset: float, antialias: bool) -> Tensor:
    """(M, M, D) position grid → (height·width, D), as `interpolate_pos_encoding` resizes it (two einsums).

    `height`, `width` are in patches and may be traced sizes; at height = width = M the grid is returned as
    stored, like the model's shortcut (with an offset the resize matrices are not the identity there).
    """
    side = grid.shape[0]
    rows = bicubic_resize_matrix(height, side, offset, antialias)
    cols = bicubic_resize_matrix(width, side, offset, antialias)
    # the model's shortcut; a Where on the (traced) size in the graph.  Only the offset > 0 matrices differ from
    # the identity there, but the graph mirrors the model in every mode.
    src = torch.arange(side, dtype=torch.float32)
    native = (torch.ones(()) * height == side) & (torch.ones(()) * width == side)
    rows = torch.where(native, (torch.arange(height, dtype=torch.float32)[:, None] == src[None, :]).float(), rows)
    cols = torch.where(native, (torch.arange(width, dtype=torch.float32)[:, None] == src[None, :]).float(), cols)
    resized = torch.einsum("ia,abd->ibd", rows, grid)
    resized = torch.einsum("jb,ibd->ijd", cols, resized)
    return resized.reshape(-1, grid.shape[-1])


class OnnxFeatureModel(nn.Module):
    """Images → ([CLS], patch tokens) after the final LayerNorm, through `InferenceViT`'s blocks.

    `dynamic_size`: the position embedding is resized in the graph for the input's size (see the module
    docstring); otherwise it is interpolated once for `image_size`² and stored.
    """

    def __init__(self, model: VisionTransformer, image_size: int, dynamic_size: bool = True):
        super().__init__()
        fast = InferenceViT(model)
        self.fast = fast
        self.image_size = image_size
        self.dynamic_size = dynamic_size
        self.patch_size = model.patch_size
        self.interpolate_offset = float(model.interpolate_offset)
        self.interpolate_antialias = bool(model.interpolate_antialias)
        with torch.no_grad():
            if dynamic_size:
                pos = model.pos_embed.detach().float()
                stored = pos.shape[1] - 1
                side = int(math.isqrt(stored))
                if side * side != stored:
                    raise UserError(f"pos_embed holds {stored} patches, not a square grid")
                self.register_buffer("class_pos", pos[:, :1].clone())
                self.register_buffer("pos_grid", pos[0, 1:].reshape(side, side, -1).clone())
            else:
                num_tokens = (image_size // model.patch_size) ** 2 + 1
                pos = model.interpolate_pos_encoding(num_tokens, image_size, image_size).detach().float()
                self.register_buffer("class_pos", pos[:, :1].clone())
                self.register_buffer("pos_patches", pos[:, 1:].clone())
        self.register_buffer("cls_token", model.cls_token.detach().clone())
        self.first_patch = 1 + model.num_register_tokens

    def position_embedding(self, height, width) -> Tensor:
        """(1, height·width, D) patch position embedding for an input of height×width pixels."""
        if not self.dynamic_size:
            return self.pos_patches
        p = self.patch_size
        grid = resize_position_grid(
            self.pos_grid, height // p, width // p, self.interpolate_offset, self.interpolate_antialias
        )
        return grid.unsqueeze(0)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        fast = self.fast
        batch, _, height, width = images.shape
        if self.dynamic_size:
            # An input whose sides are not multiples of the patch size is cropped at the bottom and right to the
            # largest multiple (what a strided patch convolution reads), instead of failing inside onnxruntime
            # with a Reshape error; the features are those of the cropped image.
            p = self.patch_size
            height, width = (height // p) * p, (width // p) * p
            images = images[:, :, :height, :width]
        patches = fast.patch_embed(images) + self.position_embedding(height, width)
        cls = (self.cls_token + self.class_pos).expand(batch, -1, -1)
        parts = [cls]
        if fast.source.register_tokens is not None:
            parts.append(fast.source.register_tokens.expand(batch, -1, -1))
        tokens = torch.cat(parts + [patches], dim=1)
        for block in fast.blocks:
            tokens = block(tokens)
        tokens = fast.norm(tokens)
        return tokens[:, 0], tokens[:, self.first_patch :]


class OnnxRopeFeatureModel(nn.Module):
    """A DINOv3 ViT (RoPE) or ConvNeXt: images → ([CLS], patch tokens) after the final norm; any batch and size.

    ViT: `InferenceViT`'s tokens and blocks, the rotary tables computed in the graph from the input's size
    (`InferenceViT.rope_tables` does not cache while tracing). ConvNeXt: the model's own `forward_features`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vit = hasattr(model, "rope_embed")
        self.fast = InferenceViT(model, matmul_patch_embed=False) if self.vit else model
        self.first_patch = 1 + model.num_register_tokens

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if not self.vit:
            out = self.fast.forward_features(images)
            return out["x_norm_clstoken"], out["x_norm_patchtokens"]
        tokens = self.fast.forward_tokens(images)
        return tokens[:, 0], tokens[:, self.first_patch :]


def uses_rope(model: nn.Module) -> bool:
    """A DINOv3 backbone (RoPE ViT or ConvNeXt): no stored position embedding to resize."""
    return not hasattr(model, "pos_embed")


def export_onnx(
    model: VisionTransformer, path: str | os.PathLike, image_size: int = 224, opset: int = 17, dynamic_size: bool = True
) -> Path:
    """Write `model` as ONNX with a dynamic batch and, by default, dynamic height and width; returns the path.

    With `dynamic_size` the graph takes any H×W that are multiples of the patch size and `image_size` is only
    the size of the example traced; without it the graph only takes `image_size`² inputs.
    """
    if image_size < model.patch_size or image_size % model.patch_size:
        raise UserError(
            f"--image_size {image_size} must be a positive multiple of the patch size {model.patch_size} "
            f"(e.g. {max(1, round(image_size / model.patch_size)) * model.patch_size})"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if uses_rope(model):  # the graph computes RoPE from the input size: always dynamic
        dynamic_size = True
        wrapper = OnnxRopeFeatureModel(model.float().eval()).eval()
    else:
        wrapper = OnnxFeatureModel(model.float().eval(), image_size, dynamic_size=dynamic_size).eval()
    example = torch.randn(2, 3, image_size, image_size)
    images_axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    patch_axes = {0: "batch", 1: "num_patches"} if dynamic_size else {0: "batch"}
    from dino.io import atomic_write

    # through a temporary file: a failed export (full disk, tracing error) leaves no partial .onnx behind
    with atomic_write(path) as handle, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            handle,
            input_names=["images"],
            output_names=["cls", "patch_tokens"],
            dynamic_axes={"images": images_axes, "cls": {0: "batch"}, "patch_tokens": patch_axes},
            opset_version=opset,
            dynamo=False,
        )
    return path


def run_onnx(path: str | os.PathLike, images: np.ndarray, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """([CLS], patch tokens) of float32 `images` (B, 3, H, W) from an exported file, with onnxruntime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    cls, patches = session.run(None, {"images": images.astype(np.float32)})
    return cls, patches


def onnx_has_dynamic_size(path: str | os.PathLike) -> bool:
    """Whether an exported file takes images of any height and width (False: one fixed size)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape  # symbolic dimensions come back as names
    return not (isinstance(shape[2], int) and isinstance(shape[3], int))


def verification_sizes(model: VisionTransformer, image_size: int) -> list[tuple[int, int]]:
    """(H, W) checked for a dynamic export: the example size, the stored grid's size, larger, non-square."""
    p = model.patch_size
    if uses_rope(model):  # no stored grid: the example size, smaller, larger and non-square, not multiples of p
        sizes = [
            (image_size, image_size),
            (max(p, image_size - 2 * p), max(p, image_size - 2 * p)),
            (image_size + 4 * p, image_size + 4 * p),
            (max(p, image_size - 2 * p), image_size + 2 * p),
            (image_size + p // 2, image_size + p - 1),
        ]
        return list(dict.fromkeys(sizes))
    side = int(math.isqrt(model.pos_embed.shape[1] - 1))
    sizes = [
        (image_size, image_size),
        (side * p, side * p),
        (image_size + 4 * p, image_size + 4 * p),
        (max(p, image_size - 2 * p), image_size + 2 * p),
        (image_size + p // 2, image_size + p - 1),
    ]  # not multiples of p: cropped to image_size² in the graph
    return list(dict.fromkeys(sizes))


def verify_onnx(
    model: VisionTransformer,
    path: str | os.PathLike,
    image_size: int,
    batch_size: int = 2,
    atol: float = 1e-4,
    sizes: list[tuple[int, int]] | None = None,
) -> float:
    """Max abs difference between PyTorch and onnxruntime features; raises UserError above `atol`.

    A fixed-size file is checked at `image_size`²; a dynamic one at `sizes` (H, W), by default
    `verification_sizes`: the first with `batch_size` images, the others with one.
    """
    if sizes is None:
        sizes = verification_sizes(model, image_size) if onnx_has_dynamic_size(path) else [(image_size, image_size)]
    model = model.float().eval()
    worst = 0.0
    for index, (height, width) in enumerate(sizes):
        images = torch.randn(batch_size if index == 0 else 1, 3, height, width)
        p = model.patch_size
        # the ViT graphs crop sizes that are not multiples of p (v3: as the model floors them); PyTorch gets the
        # same crop. A ConvNeXt takes any size as it is, in both.
        crop = images if not hasattr(model, "blocks") else images[:, :, : height // p * p, : width // p * p]
        with torch.no_grad():
            expected = model.forward_features(crop)
        cls, patches = run_onnx(path, images.numpy())
        diff = max(
            float(np.abs(cls - expected["x_norm_clstoken"].numpy()).max()),
            float(np.abs(patches - expected["x_norm_patchtokens"].numpy()).max()),
        )
        if diff > atol:
            raise UserError(
                f"ONNX export {path} differs from PyTorch by {diff:.2e} (> {atol:g}) on {height}x{width} images"
            )
        worst = max(worst, diff)
    return worst


def quantize_onnx_int8(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """int8 dynamic quantisation of an exported file's MatMul weights (onnxruntime's quantiser, per channel).

    The position-embedding resize (Einsum) stays fp32.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = Path(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"],
        )
    return target
