"""ONNX export of a backbone's features, verified with onnxruntime when it is installed.

The graph takes normalised images (batch, 3, H, W) and returns `cls` (batch, D) and `patch_tokens`
(batch, H/p · W/p, D), both after the final LayerNorm.  The batch size is dynamic.

The image size is fixed at export time: the position embedding is interpolated once for that size and
stored in the graph as a constant.  Exporting the bicubic interpolation itself gives an ONNX `Resize` whose
cubic kernel onnxruntime evaluates differently from PyTorch (optimum PR #1580, transformers #26790), so the
features would silently drift; export one file per image size instead.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dino.errors import UserError
from dino.inference.fast import InferenceViT
from dino.models.vision_transformer import VisionTransformer


class OnnxFeatureModel(nn.Module):
    """Images of one fixed size → ([CLS], patch tokens), with the position embedding baked in."""

    def __init__(self, model: VisionTransformer, image_size: int):
        super().__init__()
        fast = InferenceViT(model)
        self.fast = fast
        self.image_size = image_size
        num_tokens = (image_size // model.patch_size) ** 2 + 1
        with torch.no_grad():
            pos = model.interpolate_pos_encoding(num_tokens, image_size, image_size).detach().clone()
        self.register_buffer("pos_embed", pos)
        self.register_buffer("cls_token", model.cls_token.detach().clone())
        self.first_patch = 1 + model.num_register_tokens

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        fast = self.fast
        patches = fast.patch_embed(images) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(images.shape[0], -1, -1)
        parts = [cls]
        if fast.source.register_tokens is not None:
            parts.append(fast.source.register_tokens.expand(images.shape[0], -1, -1))
        tokens = torch.cat(parts + [patches], dim=1)
        for block in fast.blocks:
            tokens = block(tokens)
        tokens = fast.norm(tokens)
        return tokens[:, 0], tokens[:, self.first_patch:]


def export_onnx(model: VisionTransformer, path: str | os.PathLike, image_size: int = 224, opset: int = 17) -> Path:
    """Write `model` as ONNX for `image_size`² inputs with a dynamic batch dimension; returns the path."""
    if image_size % model.patch_size:
        raise UserError(f"image size {image_size} is not a multiple of the patch size {model.patch_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = OnnxFeatureModel(model.float().eval(), image_size).eval()
    example = torch.randn(2, 3, image_size, image_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (example,), str(path), input_names=["images"], output_names=["cls", "patch_tokens"],
            dynamic_axes={"images": {0: "batch"}, "cls": {0: "batch"}, "patch_tokens": {0: "batch"}},
            opset_version=opset, dynamo=False,
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


def verify_onnx(model: VisionTransformer, path: str | os.PathLike, image_size: int, batch_size: int = 2,
                atol: float = 1e-4) -> float:
    """Max abs difference between PyTorch and onnxruntime features; raises UserError above `atol`."""
    images = torch.randn(batch_size, 3, image_size, image_size)
    with torch.no_grad():
        expected = model.float().eval().forward_features(images)
    cls, patches = run_onnx(path, images.numpy())
    diff = max(float(np.abs(cls - expected["x_norm_clstoken"].numpy()).max()),
               float(np.abs(patches - expected["x_norm_patchtokens"].numpy()).max()))
    if diff > atol:
        raise UserError(f"ONNX export {path} differs from PyTorch by {diff:.2e} (> {atol:g})")
    return diff


def quantize_onnx_int8(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """int8 dynamic quantisation of an exported file's MatMul weights (onnxruntime's quantiser, per channel)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = Path(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"])
    return target
