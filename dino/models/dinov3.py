"""The DINOv3 releases: names, download URLs, how each is built, and how a state dict says which one it is.

The official hub (facebookresearch/dinov3 `hub/backbones.py`) builds every released ViT with patch 16, RoPE base
100 with per-axis coordinate normalisation and a training-time coordinate rescale of 2, fp32 RoPE tables,
LayerScale 1e-5, LayerNorm eps 1e-5, 4 storage tokens and the k-masked qkv bias; sizes differ as in
`V3_ARCH_SIZES`. The 7B and the satellite (SAT-493M) ViT-L carry an untied `local_cls_norm`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from dino.models.convnext import CONVNEXT_SIZES, ConvNeXt, convnext
from dino.models.vision_transformer import V3_ARCH_SIZES, DinoV3VisionTransformer, dinov3_vision_transformer

DINOV3_BASE_URL = "https://dl.fbaipublicfiles.com/dinov3"
DINOV3_WEIGHTS = ("LVD1689M", "SAT493M")  # the official `Weights` enum values

# hub name → (kind, arch or size, {weights: file hash}, file-name stem)
DINOV3_RELEASES: dict[str, tuple[str, str, dict[str, str], str]] = {
    "dinov3_vits16": ("vit", "vit_small", {"LVD1689M": "08c60483"}, "vits16"),
    "dinov3_vits16plus": ("vit", "vit_small_plus", {"LVD1689M": "4057cbaa"}, "vits16plus"),
    "dinov3_vitb16": ("vit", "vit_base", {"LVD1689M": "73cec8be"}, "vitb16"),
    "dinov3_vitl16": ("vit", "vit_large", {"LVD1689M": "8aa4cbdd", "SAT493M": "eadcf0ff"}, "vitl16"),
    "dinov3_vitl16plus": ("vit", "vit_large_plus", {"LVD1689M": "46503df0"}, "vitl16plus"),
    "dinov3_vith16plus": ("vit", "vit_huge_plus", {"LVD1689M": "7c1da9a5"}, "vith16plus"),
    "dinov3_vit7b16": ("vit", "vit_7b", {"LVD1689M": "a955f4ea", "SAT493M": "a6675841"}, "vit7b16"),
    "dinov3_convnext_tiny": ("convnext", "tiny", {"LVD1689M": "21b726bb"}, "convnext_tiny"),
    "dinov3_convnext_small": ("convnext", "small", {"LVD1689M": "296db49d"}, "convnext_small"),
    "dinov3_convnext_base": ("convnext", "base", {"LVD1689M": "801f2ba9"}, "convnext_base"),
    "dinov3_convnext_large": ("convnext", "large", {"LVD1689M": "61fa432d"}, "convnext_large"),
}

# the release settings every DINOv3 ViT shares (hub/backbones.py)
RELEASE_VIT_KWARGS = dict(
    img_size=224,
    patch_size=16,
    init_values=1e-5,
    n_storage_tokens=4,
    mask_k_bias=True,
    norm_eps=1e-5,
    rope_base=100.0,
    rope_normalize_coords="separate",
    rope_rescale_coords=2.0,
    rope_dtype=torch.float32,
)

_V3_INIT_KEYS = frozenset(
    {
        "img_size",
        "patch_size",
        "in_chans",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "qkv_bias",
        "proj_bias",
        "ffn_bias",
        "ffn_layer",
        "init_values",
        "drop_path_rate",
        "n_storage_tokens",
        "mask_k_bias",
        "norm_eps",
        "untie_cls_and_patch_norms",
        "untie_global_and_local_cls_norm",
        "rope_base",
        "rope_normalize_coords",
        "rope_rescale_coords",
        "rope_dtype",
        "attn_backend",
    }
)
_CONVNEXT_INIT_KEYS = frozenset({"in_chans", "drop_path_rate", "layer_scale_init_value", "patch_size"})


def dinov3_url(name: str, weights: str = "LVD1689M") -> str:
    """The official download URL of a release, e.g. .../dinov3_vits16/dinov3_vits16_pretrain_lvd1689m-08c60483.pth."""
    _, _, hashes, stem = DINOV3_RELEASES[name]
    if weights not in hashes:
        raise ValueError(f"{name} has no {weights} release; it has: {', '.join(hashes)}")
    return f"{DINOV3_BASE_URL}/dinov3_{stem}/dinov3_{stem}_pretrain_{weights.lower()}-{hashes[weights]}.pth"


def build_dinov3(name: str, weights: str = "LVD1689M", **kwargs) -> DinoV3VisionTransformer | ConvNeXt:
    """The model of a release, un-initialised beyond the official init; `kwargs` override the release settings.

    `weights` picks the variant: the 7B always has `local_cls_norm`, the ViT-L only its SAT-493M file.
    """
    kind, arch, _, _ = DINOV3_RELEASES[name]
    if kind == "convnext":
        return convnext(arch, **kwargs)
    params: dict[str, Any] = dict(RELEASE_VIT_KWARGS)
    params["untie_global_and_local_cls_norm"] = arch == "vit_7b" or (arch == "vit_large" and weights == "SAT493M")
    params.update(kwargs)
    return dinov3_vision_transformer(arch, **params)


def is_dinov3_state_dict(state_dict: dict) -> bool:
    return "rope_embed.periods" in state_dict or "storage_tokens" in state_dict or is_convnext_state_dict(state_dict)


def is_convnext_state_dict(state_dict: dict) -> bool:
    return "downsample_layers.0.0.weight" in state_dict


def _count(state_dict: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
    return 1 + max(found) if found else 0


def describe_dinov3_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a DINOv3 state dict holds, from its keys and shapes: `name` (the release it has the layout of, or
    None), `arch`, `kind`, `summary` (one human line) and `model_kwargs` that build a model it loads into strictly."""
    if is_convnext_state_dict(state_dict):
        dims = [state_dict["downsample_layers.0.0.weight"].shape[0]]
        dims += [
            state_dict[f"downsample_layers.{i}.1.weight"].shape[0]
            for i in (1, 2, 3)
            if f"downsample_layers.{i}.1.weight" in state_dict
        ]
        depths = [_count(state_dict, rf"stages\.{i}\.(\d+)\.") for i in range(4)]
        size = next((s for s, (d, w) in CONVNEXT_SIZES.items() if list(d) == depths and list(w) == dims), None)
        name = f"dinov3_convnext_{size}" if size else None
        return dict(
            kind="convnext",
            name=name,
            arch=size,
            embed_dim=dims[-1],
            depth=sum(depths),
            patch_size=32,
            num_register_tokens=0,
            model_kwargs=dict(depths=depths, dims=dims),
            summary=f"a DINOv3 ConvNeXt{'-' + size if size else ''} (depths {depths}, dims {dims})"
            + (f", the layout of {name}" if name else ""),
        )
    try:
        embed_dim = state_dict["cls_token"].shape[-1]
        patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
        head_dim = 4 * state_dict["rope_embed.periods"].shape[0]
    except KeyError as err:
        raise ValueError(f"not a DINOv3 ViT state dict: key {err.args[0]!r} is missing") from None
    depth = _count(state_dict, r"blocks\.(\d+)\.")
    num_heads = embed_dim // head_dim
    kwargs: dict[str, Any] = dict(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        patch_size=patch_size,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        mask_k_bias="blocks.0.attn.qkv.bias_mask" in state_dict or "blocks.0.attn.qkv.bias" not in state_dict,
        n_storage_tokens=state_dict["storage_tokens"].shape[1] if "storage_tokens" in state_dict else 0,
        init_values=1e-5 if "blocks.0.ls1.gamma" in state_dict else None,
        untie_cls_and_patch_norms="cls_norm.weight" in state_dict,
        untie_global_and_local_cls_norm="local_cls_norm.weight" in state_dict,
        ffn_bias="blocks.0.mlp.fc1.bias" in state_dict or "blocks.0.mlp.w1.bias" in state_dict,
        proj_bias="blocks.0.attn.proj.bias" in state_dict,
    )
    if "blocks.0.mlp.w1.weight" in state_dict:
        hidden = state_dict["blocks.0.mlp.w1.weight"].shape[0]
        # SwiGLU hidden = int(2/3 · ratio · D) rounded up to 8 (or 64): find a ratio and alignment that give it
        candidates = ((6.0, "swiglu_w123", 8), (3.0, "swiglu_w123_64", 64), (4.0, "swiglu_w123", 8))
        ratio, ffn_layer = next(
            (
                (r, f)
                for r, f, align in candidates
                if int(r * embed_dim * 2 / 3) + (-int(r * embed_dim * 2 / 3) % align) == hidden
            ),
            (hidden * 1.5 / embed_dim, "swiglu_w123"),
        )
        kwargs.update(mlp_ratio=ratio, ffn_layer=ffn_layer)
    elif "blocks.0.mlp.fc1.weight" in state_dict:
        kwargs.update(mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim, ffn_layer="mlp")
    arch = None
    for candidate, (dim, d, heads, ratio, ffn, qkv_bias) in V3_ARCH_SIZES.items():
        if (dim, d, heads, ffn, qkv_bias) == (
            embed_dim,
            depth,
            num_heads,
            kwargs.get("ffn_layer"),
            kwargs["qkv_bias"],
        ) and ratio == kwargs.get("mlp_ratio"):
            arch = candidate
    name = next((n for n, (kind, a, _, _) in DINOV3_RELEASES.items() if kind == "vit" and a == arch), None)
    if name and (patch_size != 16 or kwargs["n_storage_tokens"] != 4):
        name = None
    variant = " (with local_cls_norm: SAT-493M / 7B variant)" if kwargs["untie_global_and_local_cls_norm"] else ""
    summary = (
        f"a DINOv3 ViT{'' if arch is None else ' ' + arch} (embed_dim {embed_dim}, depth {depth}, {num_heads} heads, "
        f"patch {patch_size}, {kwargs['n_storage_tokens']} storage tokens, ffn {kwargs.get('ffn_layer')}){variant}"
        + (f", the layout of {name}" if name else "")
    )
    return dict(
        kind="vit",
        name=name,
        arch=arch,
        embed_dim=embed_dim,
        depth=depth,
        patch_size=patch_size,
        num_register_tokens=kwargs["n_storage_tokens"],
        model_kwargs=kwargs,
        summary=summary,
    )


def build_dinov3_for_state_dict(
    state_dict: dict[str, torch.Tensor], stored_kwargs: dict | None = None, **model_kwargs
) -> DinoV3VisionTransformer | ConvNeXt:
    """A model (on the meta device: no memory until the weights are assigned) that the state dict fits.

    Release settings (RoPE, eps) for the ViTs, sizes from the shapes; `stored_kwargs` (saved next to our own
    files) and `model_kwargs` (runtime options such as attn_backend, drop_path_rate) win where they apply."""
    info = describe_dinov3_state_dict(state_dict)
    accepted = _CONVNEXT_INIT_KEYS if info["kind"] == "convnext" else _V3_INIT_KEYS
    extra = {k: v for k, v in (stored_kwargs or {}).items() if k in accepted}
    if info["kind"] == "convnext":  # ViT-only runtime options (attn_backend, …) mean nothing to a ConvNeXt
        model_kwargs = {k: v for k, v in model_kwargs.items() if k in accepted}
    extra.update(model_kwargs)
    with torch.device("meta"):
        if info["kind"] == "convnext":
            return ConvNeXt(**info["model_kwargs"], **extra)
        params: dict[str, Any] = dict(RELEASE_VIT_KWARGS)
        params.update(info["model_kwargs"])
        params.update(extra)
        return DinoV3VisionTransformer(**params)


# --- the Hugging Face transformers layout (DINOv3ViTModel / DINOv3ConvNextModel, transformers ≥ 4.56) ----------
_HF_MLP_NAMES = {"fc1": "up_proj", "fc2": "down_proj", "w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
_HF_CONVNEXT_BLOCK_NAMES = {
    "dwconv": "depthwise_conv",
    "norm": "layer_norm",
    "pwconv1": "pointwise_conv1",
    "pwconv2": "pointwise_conv2",
    "gamma": "gamma",
}


def to_transformers(model: DinoV3VisionTransformer | ConvNeXt) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, state dict) that transformers' `DINOv3ViTModel` / `DINOv3ConvNextModel` load strictly and
    compute the same outputs from (`last_hidden_state` = normed [CLS, storage, patches]).

    transformers splits qkv into q/k/v and has no k bias: the k bias is dropped, which is exact only because the
    k-bias mask zeroes it — a model whose `bias_mask` is not (1, 0, 1) is refused. Untied cls norms and a RoPE
    other than the releases' have no transformers equivalent and are refused too.
    """
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model, ConvNeXt):
        config = dict(
            model_type="dinov3_convnext",
            architectures=["DINOv3ConvNextModel"],
            num_channels=3,
            hidden_sizes=list(model.embed_dims),
            depths=list(model.depths),
            hidden_act="gelu",
            layer_norm_eps=1e-6,
            layer_scale_init_value=1e-6,
        )
        out = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "downsample_layers":
                out[f"model.stages.{parts[1]}.downsample_layers.{'.'.join(parts[2:])}"] = value
            elif parts[0] == "stages":
                out[
                    ".".join(
                        [f"model.stages.{parts[1]}.layers.{parts[2]}", _HF_CONVNEXT_BLOCK_NAMES[parts[3]], *parts[4:]]
                    )
                ] = value
            elif parts[0] == "norm":
                out[f"layer_norm.{parts[1]}"] = value
        return config, out

    rope = model.rope_embed
    if model.cls_norm is not None or rope.normalize_coords != "separate":
        raise ValueError("transformers' DINOv3ViTModel has no untied cls_norm and only per-axis RoPE coordinates")
    first = model.blocks[0]
    dim, heads = model.embed_dim, model.num_heads
    gated = hasattr(first.mlp, "w1")
    qkv_bias = first.attn.qkv.bias is not None
    norm_eps = first.norm1.eps
    config = dict(
        model_type="dinov3_vit",
        architectures=["DINOv3ViTModel"],
        image_size=model.img_size,
        patch_size=model.patch_size,
        num_channels=model.patch_embed.proj.in_channels,
        hidden_size=dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=heads,
        intermediate_size=(first.mlp.w1 if gated else first.mlp.fc1).out_features,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        layer_norm_eps=norm_eps,
        rope_theta=rope.base,
        pos_embed_rescale=rope.rescale_coords,
        num_register_tokens=model.n_storage_tokens,
        layerscale_value=1.0,
        query_bias=qkv_bias,
        key_bias=False,
        value_bias=qkv_bias,
        proj_bias=first.attn.proj.bias is not None,
        mlp_bias=(first.mlp.w1 if gated else first.mlp.fc1).bias is not None,
    )
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": state["mask_token"][None],
        "embeddings.patch_embeddings.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": state["patch_embed.proj.bias"],
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    if model.storage_tokens is not None:
        out["embeddings.register_tokens"] = state["storage_tokens"]
    expected_mask = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    for i in range(len(model.blocks)):
        p, q = f"blocks.{i}.", f"model.layer.{i}."
        weight = state[p + "attn.qkv.weight"]
        out.update(
            {
                q + "attention.q_proj.weight": weight[:dim],
                q + "attention.k_proj.weight": weight[dim : 2 * dim],
                q + "attention.v_proj.weight": weight[2 * dim :],
                q + "attention.o_proj.weight": state[p + "attn.proj.weight"],
                q + "layer_scale1.lambda1": state[p + "ls1.gamma"],
                q + "layer_scale2.lambda1": state[p + "ls2.gamma"],
            }
        )
        if qkv_bias:
            mask = state.get(p + "attn.qkv.bias_mask")
            if mask is None or not torch.equal(mask.float().cpu(), expected_mask):
                raise ValueError(f"block {i}: transformers has no k bias; only a k bias masked to zero converts")
            bias = state[p + "attn.qkv.bias"]
            out[q + "attention.q_proj.bias"], out[q + "attention.v_proj.bias"] = bias[:dim], bias[2 * dim :]
        if p + "attn.proj.bias" in state:
            out[q + "attention.o_proj.bias"] = state[p + "attn.proj.bias"]
        for norm in ("norm1", "norm2"):
            out[q + norm + ".weight"], out[q + norm + ".bias"] = state[p + norm + ".weight"], state[p + norm + ".bias"]
        for ours, theirs in _HF_MLP_NAMES.items():
            for suffix in ("weight", "bias"):
                if f"{p}mlp.{ours}.{suffix}" in state:
                    out[f"{q}mlp.{theirs}.{suffix}"] = state[f"{p}mlp.{ours}.{suffix}"]
    return config, out
