"""Hugging Face `Dinov2Model` checkpoints: our key layout ↔ the hub layout of `facebook/dinov2-*`.

`export_hf` writes a folder that `transformers.Dinov2Model.from_pretrained(folder)` loads
(`Dinov2WithRegistersModel` for models with register tokens): `config.json` and `model.safetensors`
(`pytorch_model.bin` when safetensors is not installed).  The tensor names are those of the released hub
checkpoints (`attention.attention.query`, `attention.output.dense`, `mlp.weights_in`, …), which every
transformers version since 4.35 reads (5.x renames them on load).  The same names are what dinov2.cpp's
GGUF files use, so `hf_state_dict` also feeds the GGUF exporter.

Position embeddings (v1/v2): transformers resizes the stored grid to the input's size its own way (bicubic to a
target size, no offset), not as our model / the official code does (a scale factor with offset 0.1), so features
agree only where neither resizes: at the stored grid's size. `export_hf(..., image_size=S)` stores the embedding
our model computes for S×S (the config's `image_size` becomes S), so the exported model is exact at S; at any
other size transformers resizes that grid and the features differ (`verify_hf` measures and reports by how much).
DINOv3 (`dino.models.dinov3.to_transformers`, `DINOv3ViTModel` / `DINOv3ConvNextModel`, transformers ≥ 4.56) has
no stored position embedding: RoPE is computed from the size, the same at every size.
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


def is_dinov3(model) -> bool:
    """A DINOv3 backbone (RoPE ViT or ConvNeXt), exported through `to_transformers`."""
    return not hasattr(model, "pos_embed")


def baked_position_embedding(model: VisionTransformer, image_size: int) -> Tensor:
    """(1, 1 + (S/p)², D): the embedding our model uses for S×S inputs (what transformers then uses unresized)."""
    p = model.patch_size
    if image_size < p or image_size % p:
        raise UserError(f"--image_size {image_size} must be a positive multiple of the patch size {p}")
    with torch.no_grad():
        return model.interpolate_pos_encoding(1 + (image_size // p) ** 2, image_size, image_size).detach().float().cpu()


def hf_state_dict(model: VisionTransformer, image_size: int | None = None) -> dict[str, Tensor]:
    """The backbone's tensors under Hugging Face `Dinov2Model` names (no `dinov2.` prefix), fp32, CPU.

    The fused qkv projection is split into query / key / value (rows are ordered q, k, v, as the attention
    reshape (B, N, 3, heads, hd) reads them). A model without LayerScale (DINO v1) gets γ = 1, which is the
    identity, since `Dinov2Model` always has the layer. `image_size`: store the position embedding for that size
    (`baked_position_embedding`) instead of the model's own grid.
    """
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if image_size is not None:
        state["pos_embed"] = baked_position_embedding(model, image_size)
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
            out[f"{theirs}attention.attention.{name}.weight"] = qkv_w[index * dim : (index + 1) * dim]
            bias_key = ours + "attn.qkv.bias"
            bias = state[bias_key][index * dim : (index + 1) * dim] if bias_key in state else torch.zeros(dim)
            out[f"{theirs}attention.attention.{name}.bias"] = bias
        for our_name, their_name in _BLOCK_RENAMES.items():
            for suffix in ("weight", "bias", ""):
                key = ours + our_name + (f".{suffix}" if suffix else "")
                if key in state:
                    out[theirs + their_name + (f".{suffix}" if suffix else "")] = state[key]
        for ls in ("layer_scale1.lambda1", "layer_scale2.lambda1"):
            out.setdefault(theirs + ls, torch.ones(dim))
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(model: VisionTransformer, image_size: int | None = None) -> dict:
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
        "image_size": image_size or model.img_size,
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


def export_hf(model: VisionTransformer, folder: str | os.PathLike, image_size: int | None = None) -> Path:
    """Write a Hugging Face checkpoint folder (config.json + weights); returns the folder.

    `image_size` (v1/v2): bake the position embedding for S×S inputs (see the module docstring); None keeps the
    stored grid. DINOv3: written by `to_transformers` (`image_size` only sets the config's nominal size).
    """
    if is_dinov3(model):
        from dino.models.dinov3 import to_transformers

        try:
            config, state = to_transformers(model)
        except ValueError as error:
            raise UserError(f"cannot export this DINOv3 model to the Hugging Face format: {error}") from None
        if image_size is not None and "image_size" in config:
            config["image_size"] = int(image_size)
        state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    else:
        if model.interpolate_offset and model.num_register_tokens:
            raise UserError(
                "Dinov2WithRegistersModel interpolates like the official register models (offset 0); "
                "this model uses interpolate_offset > 0 and would give different features"
            )
        state = hf_state_dict(model, image_size)
        config = hf_config(model, image_size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from dino.io import atomic_output_path, atomic_torch_save, atomic_write_json

    try:
        from safetensors.torch import save_file

        with atomic_output_path(folder / "model.safetensors") as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
    except ImportError:
        atomic_torch_save(state, folder / "pytorch_model.bin")
    atomic_write_json(folder / "config.json", config, indent=2)
    return folder


def hf_verification_sizes(model, image_size: int | None = None) -> list[int]:
    """The size the export is exact at (the baked or stored one), then another (a smaller multiple of the patch)."""
    p = model.patch_size
    exact = int(image_size or getattr(model, "img_size", None) or 224)
    other = max(p, (exact * 3 // 4) // p * p)
    if other == exact:
        other = exact + 2 * p
    return [exact, other]


def _hf_tokens(hf, model, images: Tensor) -> tuple[Tensor, Tensor]:
    out = hf(pixel_values=images)
    tokens = out.last_hidden_state
    if is_dinov3(model) and not hasattr(model, "blocks"):  # ConvNeXt: [pooled, patches], normed
        return tokens[:, 0], tokens[:, 1:]
    cls, _, patches = split_tokens(tokens, model.num_register_tokens)
    return cls, patches


def verify_hf(
    model: VisionTransformer,
    folder: str | os.PathLike,
    batch_size: int = 2,
    atol: float = 1e-4,
    image_size: int | None = None,
) -> dict:
    """Load the folder with transformers and compare its tokens with ours at two sizes (`hf_verification_sizes`).

    Returns {"max_abs_diff": at the exact size (raises UserError above `atol`), "sizes": {"HxW": diff, …},
    "note": where outputs differ, in words}. v1/v2: the second size is measured and reported, not required to
    match (transformers resizes the position embedding its own way); DINOv3: every size must match.
    """
    import transformers

    if is_dinov3(model):
        hf = transformers.AutoModel.from_pretrained(str(folder)).eval()
    else:
        cls_name = "Dinov2WithRegistersModel" if model.num_register_tokens else "Dinov2Model"
        hf = getattr(transformers, cls_name).from_pretrained(str(folder)).eval()
    model = model.float().eval()
    sizes = hf_verification_sizes(model, image_size)
    diffs = {}
    for index, size in enumerate(sizes):
        images = torch.randn(batch_size, 3, size, size)
        with torch.no_grad():
            ours = model.forward_features(images)
            their_cls, their_patches = _hf_tokens(hf, model, images)
        diff = max(
            float((their_cls - ours["x_norm_clstoken"]).abs().max()),
            float((their_patches - ours["x_norm_patchtokens"]).abs().max()),
        )
        diffs[f"{size}x{size}"] = diff
        if diff > atol and (index == 0 or is_dinov3(model)):
            raise UserError(
                f"Hugging Face export {folder} differs from PyTorch by {diff:.2e} (> {atol:g}) at {size}x{size}"
            )
    exact, other = sizes
    if is_dinov3(model):
        note = (
            "DINOv3: no stored position embedding (RoPE from the input size, or a ConvNeXt), so outputs agree at "
            "every size"
        )
    else:
        note = (
            f"outputs equal ours at {exact}x{exact} (the position embedding is stored for that size); at any other "
            f"size transformers resizes it its own way and features differ (max {diffs[f'{other}x{other}']:.2g} at "
            f"{other}x{other}): re-export with --image_size for the size you run"
        )
    return dict(max_abs_diff=diffs[f"{exact}x{exact}"], sizes=diffs, note=note)
