"""Hugging Face `Dinov2Model` checkpoints: our key layout ↔ the hub layout of `facebook/dinov2-*`.

`export_hf` writes a folder that `transformers.Dinov2Model.from_pretrained(folder)` loads
(`Dinov2WithRegistersModel` for models with register tokens): `config.json` and `model.safetensors`
(`pytorch_model.bin` when safetensors is not installed).  The tensor names are those of the released hub
checkpoints (`attention.attention.query`, `attention.output.dense`, `mlp.weights_in`, …), which every
transformers version since 4.35 reads (5.x renames them on load).  The same names are what dinov2.cpp's
GGUF files use, so `hf_state_dict` also feeds the GGUF exporter.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from dino.errors import UserError
from dino.models.vision_transformer import VisionTransformer, split_tokens

_BLOCK_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w12": "mlp.weights_in",
    "mlp.w3": "mlp.weights_out",
}


def hf_state_dict(model: VisionTransformer) -> dict[str, Tensor]:
    """The backbone's tensors under Hugging Face `Dinov2Model` names (no `dinov2.` prefix), fp32, CPU.

    The fused qkv projection is split into query / key / value (rows are ordered q, k, v, as the attention
    reshape (B, N, 3, heads, hd) reads them). A model without LayerScale (DINO v1) gets γ = 1, which is the
    identity, since `Dinov2Model` always has the layer.
    """
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    dim = model.embed_dim
    out: dict[str, Tensor] = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": state.get("mask_token", torch.zeros(1, dim)),
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    if "register_tokens" in state:
        out["embeddings.register_tokens"] = state["register_tokens"]
    for i in range(len(model.blocks)):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        qkv_w = state[ours + "attn.qkv.weight"]
        for index, name in enumerate(("query", "key", "value")):
            out[f"{theirs}attention.attention.{name}.weight"] = qkv_w[index * dim:(index + 1) * dim]
            bias_key = ours + "attn.qkv.bias"
            bias = state[bias_key][index * dim:(index + 1) * dim] if bias_key in state else torch.zeros(dim)
            out[f"{theirs}attention.attention.{name}.bias"] = bias
        for our_name, their_name in _BLOCK_RENAMES.items():
            for suffix in ("weight", "bias", ""):
                key = ours + our_name + (f".{suffix}" if suffix else "")
                if key in state:
                    out[theirs + their_name + (f".{suffix}" if suffix else "")] = state[key]
        for ls in ("layer_scale1.lambda1", "layer_scale2.lambda1"):
            out.setdefault(theirs + ls, torch.ones(dim))
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(model: VisionTransformer) -> dict:
    """config.json for the exported model (Dinov2Config, or Dinov2WithRegistersConfig with registers)."""
    swiglu = hasattr(model.blocks[0].mlp, "w12")
    registers = model.num_register_tokens
    first = model.blocks[0]
    # the MLP width; for SwiGLU the 2/3 rounding is applied by both implementations to the same ratio
    hidden = first.mlp.fc1.out_features if not swiglu else None
    ratio = hidden / model.embed_dim if hidden else 4
    config = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": model.embed_dim,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": model.num_heads,
        "mlp_ratio": int(ratio) if float(ratio).is_integer() else ratio,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "image_size": model.img_size,
        "patch_size": model.patch_size,
        "num_channels": 3,
        "qkv_bias": first.attn.qkv.bias is not None,
        "layerscale_value": 1.0,
        "use_swiglu_ffn": swiglu,
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "torch_dtype": "float32",
    }
    if registers:
        config["num_register_tokens"] = registers
    return config


def export_hf(model: VisionTransformer, folder: str | os.PathLike) -> Path:
    """Write a Hugging Face checkpoint folder (config.json + weights); returns the folder."""
    if model.interpolate_offset and model.num_register_tokens:
        raise UserError("Dinov2WithRegistersModel interpolates like the official register models (offset 0); "
                        "this model uses interpolate_offset > 0 and would give different features")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model)
    from dino.io import atomic_output_path, atomic_torch_save, atomic_write_json

    try:
        from safetensors.torch import save_file

        with atomic_output_path(folder / "model.safetensors") as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
    except ImportError:
        atomic_torch_save(state, folder / "pytorch_model.bin")
    atomic_write_json(folder / "config.json", hf_config(model), indent=2)
    return folder


def verify_hf(model: VisionTransformer, folder: str | os.PathLike, batch_size: int = 2, atol: float = 1e-4) -> float:
    """Load the folder with transformers and compare its tokens with ours at the stored image size.

    The comparison runs at the model's native size, where neither implementation interpolates the
    position embedding (transformers resizes to a target size, we by a scale factor with offset 0.1, as
    the official DINOv2 code does; at other sizes the two differ by the interpolation alone).
    """
    import transformers

    cls_name = "Dinov2WithRegistersModel" if model.num_register_tokens else "Dinov2Model"
    hf = getattr(transformers, cls_name).from_pretrained(str(folder)).eval()
    images = torch.randn(batch_size, 3, model.img_size, model.img_size)
    with torch.no_grad():
        ours = model.float().eval().forward_features(images)
        theirs = hf(pixel_values=images).last_hidden_state
    their_cls, _, their_patches = split_tokens(theirs, model.num_register_tokens)
    diff = max(float((their_cls - ours["x_norm_clstoken"]).abs().max()),
               float((their_patches - ours["x_norm_patchtokens"]).abs().max()))
    if diff > atol:
        raise UserError(f"Hugging Face export {folder} differs from PyTorch by {diff:.2e} (> {atol:g})")
    return diff
