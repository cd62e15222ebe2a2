"""GGUF export for dinov2.cpp (lavaman131/dinov2.cpp, ggml), verified by reading the file back.

What dinov2.cpp reads (facts from its `dinov2.cpp` loader and `scripts/dinov2-to-gguf.py`):

- metadata, all uint32: `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `patch_size`, `img_size`,
  `ftype` (0 = f32, 1 = f16), `num_register_tokens`, and `num_classes` (+ one string per class id, "0", "1",
  …, read only in classification mode; a backbone has 0 classes); `general.architecture` is "dinov2";
- tensors under the Hugging Face `Dinov2Model` names without the `dinov2.` prefix (see `export.hf`);
  `embeddings.mask_token` is left out; the patch-embedding bias is stored as (1, D, 1, 1) so ggml can
  broadcast it over the conv output;
- with ftype 1, matrices are f16 while 1-D tensors, `embeddings.position_embeddings`, `embeddings.cls_token`
  and `embeddings.register_tokens` stay f32 (the runtime reads the position embedding as f32 to interpolate it);
- attention weights: the runtime reads a fused `attention.attention.qkv` (rows q, k, v — our own `attn.qkv`
  layout; its `attn()` looks up `.attention.attention.qkv.weight/.bias`), which is what is written by default
  (`qkv_layout="fused"`). Older versions read `attention.attention.{query,key,value}` (`"split"`); `"both"`
  writes the two, but the loader copies every tensor of the file, so the unused copy costs memory (40 MiB for
  ViT-S at 518²) for nothing.
- DINOv3 has no ggml model (the runtime has no RoPE): a v3 backbone is refused with the formats that work.
- the SwiGLU FFN (`mlp.weights_in` / `mlp.weights_out`) is used by the runtime only for 40-block models (ViT-g).

LayerNorm eps is not stored: dinov2.cpp takes it from its `--epsilon` flag (the DINOv2 value is 1e-6).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dino.errors import UserError
from dino.inference.export.hf import hf_state_dict
from dino.models.vision_transformer import VisionTransformer

FTYPES = {"f32": 0, "f16": 1}
QKV_LAYOUTS = ("both", "split", "fused")
_ALWAYS_F32 = {"embeddings.position_embeddings", "embeddings.cls_token", "embeddings.register_tokens"}


DEFAULT_QKV_LAYOUT = "fused"  # what dinov2.cpp reads


def check_gguf_supported(model) -> None:
    """A DINOv3 backbone (RoPE ViT or ConvNeXt) has no dinov2.cpp / ggml model: one line naming what works."""
    if not hasattr(model, "pos_embed"):
        raise UserError(
            f"GGUF (dinov2.cpp) cannot run {type(model).__name__}: the ggml runtime has no RoPE / ConvNeXt "
            "model for DINOv3; export it with --format onnx or --format hf instead"
        )


def gguf_tensors(
    model: VisionTransformer, ftype: str = "f32", qkv_layout: str = DEFAULT_QKV_LAYOUT
) -> dict[str, np.ndarray]:
    """The arrays written to the GGUF file, by name, already in their stored dtype and shape."""
    check_gguf_supported(model)
    if ftype not in FTYPES:
        raise UserError(f"unknown GGUF ftype {ftype!r}; choose one of {', '.join(FTYPES)}")
    if qkv_layout not in QKV_LAYOUTS:
        raise UserError(f"unknown qkv layout {qkv_layout!r}; choose one of {', '.join(QKV_LAYOUTS)}")
    state = hf_state_dict(model)
    state.pop("embeddings.mask_token", None)
    if qkv_layout in ("both", "fused"):
        for i in range(len(model.blocks)):
            state[f"encoder.layer.{i}.attention.attention.qkv.weight"] = (
                model.blocks[i].attn.qkv.weight.detach().float()
            )
            qkv_bias = model.blocks[i].attn.qkv.bias
            state[f"encoder.layer.{i}.attention.attention.qkv.bias"] = (
                qkv_bias.detach().float() if qkv_bias is not None else torch.zeros(3 * model.embed_dim)
            )
    if qkv_layout == "fused":
        state = {
            k: v
            for k, v in state.items()
            if not any(f".attention.attention.{n}." in k for n in ("query", "key", "value"))
        }
    arrays = {}
    for name, tensor in state.items():
        array = tensor.detach().cpu().contiguous().numpy().astype(np.float32)
        if ftype == "f16" and tensor.ndim != 1 and name not in _ALWAYS_F32:
            array = array.astype(np.float16)
        if name == "embeddings.patch_embeddings.projection.bias":
            array = array.reshape(1, -1, 1, 1)  # after the dtype choice: the runtime's converter keeps it f32
        arrays[name] = array
    return arrays


def gguf_metadata(model: VisionTransformer, ftype: str = "f32") -> dict[str, int]:
    return {
        "hidden_size": model.embed_dim,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": model.num_heads,
        "num_classes": 0,
        "patch_size": model.patch_size,
        "img_size": model.img_size,
        "ftype": FTYPES[ftype],
        "num_register_tokens": model.num_register_tokens,
    }


def export_gguf(
    model: VisionTransformer, path: str | os.PathLike, ftype: str = "f32", qkv_layout: str = DEFAULT_QKV_LAYOUT
) -> Path:
    """Write `model` as a dinov2.cpp GGUF file; returns the path."""
    check_gguf_supported(model)
    import gguf

    if model.embed_dim % model.num_heads:
        raise UserError(f"embed_dim {model.embed_dim} is not divisible by {model.num_heads} heads")
    from dino.io import atomic_output_path

    path = Path(path)
    tensors = gguf_tensors(model, ftype, qkv_layout)
    # GGUFWriter opens the file by name: write a fresh temporary name, renamed into place when complete
    with atomic_output_path(path, needed_bytes=sum(a.nbytes for a in tensors.values())) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="dinov2")
        for key, value in gguf_metadata(model, ftype).items():
            writer.add_uint32(key, int(value))
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """(uint32 metadata, tensors by name in their numpy shape) of a GGUF file, via the gguf package."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    metadata = {}
    for field in reader.fields.values():
        if field.types == [gguf.GGUFValueType.UINT32] and not field.name.startswith("GGUF."):
            metadata[field.name] = int(field.parts[field.data[0]][0])
    tensors = {t.name: np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    return metadata, tensors


def verify_gguf(
    model: VisionTransformer, path: str | os.PathLike, ftype: str = "f32", qkv_layout: str = DEFAULT_QKV_LAYOUT
) -> int:
    """Read the file back and compare every tensor and the metadata with `model`; returns the tensor count."""
    metadata, tensors = read_gguf(path)
    expected_meta = gguf_metadata(model, ftype)
    wrong = {k: (metadata.get(k), v) for k, v in expected_meta.items() if metadata.get(k) != v}
    if wrong:
        raise UserError(f"GGUF metadata of {path} differs (found, expected): {wrong}")
    expected = gguf_tensors(model, ftype, qkv_layout)
    if set(tensors) != set(expected):
        raise UserError(
            f"GGUF tensors of {path} differ: missing {sorted(set(expected) - set(tensors))[:5]}, "
            f"unexpected {sorted(set(tensors) - set(expected))[:5]}"
        )
    for name, array in expected.items():
        stored = tensors[name]
        if stored.dtype != array.dtype or stored.shape != array.shape or not np.array_equal(stored, array):
            raise UserError(
                f"GGUF tensor {name} of {path} differs from the model "
                f"({stored.dtype}{list(stored.shape)} vs {array.dtype}{list(array.shape)})"
            )
    return len(expected)
