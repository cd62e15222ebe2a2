"""DINOv3 ViT against the two public re-implementations, where installed: Hugging Face transformers'
`DINOv3ViTModel` (≥ 4.56; its own key layout, reached through a mapping written here) and timm's Eva
(`vit_*_patch16_dinov3_qkvb`, loaded through timm's own converter of the official layout). Random weights in the
official layout; square, non-square and not-a-multiple-of-16 inputs."""

from __future__ import annotations

import pytest
import torch

from dino.hub import build_backbone_from_state_dict
from test_models_v3 import official_v3_vit_state_dict, swiglu_hidden

SIZES = [(64, 64), (48, 80), (70, 90)]


def to_hf_layout(sd: dict, depth: int, dim: int) -> dict:
    """The official layout in transformers' DINOv3 names: qkv split into q/k/v, k bias dropped (it is masked)."""
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"][None],
        "embeddings.register_tokens": sd["storage_tokens"],
        "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    mlp_names = {"fc1": "up_proj", "fc2": "down_proj", "w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
    for i in range(depth):
        p, q = f"blocks.{i}.", f"model.layer.{i}."
        w, b = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]
        out.update(
            {
                q + "attention.q_proj.weight": w[:dim],
                q + "attention.q_proj.bias": b[:dim],
                q + "attention.k_proj.weight": w[dim : 2 * dim],
                q + "attention.v_proj.weight": w[2 * dim :],
                q + "attention.v_proj.bias": b[2 * dim :],
                q + "attention.o_proj.weight": sd[p + "attn.proj.weight"],
                q + "attention.o_proj.bias": sd[p + "attn.proj.bias"],
                q + "layer_scale1.lambda1": sd[p + "ls1.gamma"],
                q + "layer_scale2.lambda1": sd[p + "ls2.gamma"],
            }
        )
        for norm in ("norm1", "norm2"):
            out[q + norm + ".weight"], out[q + norm + ".bias"] = sd[p + norm + ".weight"], sd[p + norm + ".bias"]
        for ours, theirs in mlp_names.items():
            if p + f"mlp.{ours}.weight" in sd:
                out[q + f"mlp.{theirs}.weight"] = sd[p + f"mlp.{ours}.weight"]
                out[q + f"mlp.{theirs}.bias"] = sd[p + f"mlp.{ours}.bias"]
    return out


def all_tokens(out: dict) -> torch.Tensor:
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]], dim=1)


@pytest.mark.parametrize("gated", [False, True], ids=["S/16", "S+/16"])
def test_matches_transformers_dinov3(gated):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip("transformers < 4.56 has no DINOv3ViTModel")
    hidden = swiglu_hidden(384, 6) if gated else None
    sd = official_v3_vit_state_dict(depth=2, swiglu_hidden=hidden)
    config = transformers.DINOv3ViTConfig(
        hidden_size=384,
        num_hidden_layers=2,
        num_attention_heads=6,
        intermediate_size=hidden or 1536,
        patch_size=16,
        num_register_tokens=4,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        layer_norm_eps=1e-5,
        rope_theta=100.0,
    )
    theirs = transformers.DINOv3ViTModel(config).eval()
    theirs.load_state_dict(to_hf_layout(sd, 2, 384), strict=True)
    ours = build_backbone_from_state_dict(sd).eval()
    for size in SIZES:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = theirs(pixel_values=x).last_hidden_state
            got = all_tokens(ours.forward_features(x))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "name,swiglu",
    [("vit_small_patch16_dinov3_qkvb", None), ("vit_small_plus_patch16_dinov3_qkvb", 1536)],
    ids=["S/16", "S+/16"],
)
def test_matches_timm_eva_dinov3(name, swiglu):
    timm = pytest.importorskip("timm")
    eva = pytest.importorskip("timm.models.eva")
    if name not in timm.list_models("*dinov3*"):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    sd = official_v3_vit_state_dict(depth=2, swiglu_hidden=swiglu, seed=1)
    theirs = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, depth=2).eval()
    theirs.load_state_dict(eva.checkpoint_filter_fn(sd, theirs), strict=True)
    ours = build_backbone_from_state_dict(sd).eval()
    for size in SIZES:
        x = torch.randn(2, 3, *size)
        h, w = size[0] // 16 * 16, size[1] // 16 * 16  # timm asserts multiples; the official conv floors = crops
        with torch.no_grad():
            expected = theirs.forward_features(x[:, :, :h, :w])
            got = all_tokens(ours.forward_features(x))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_convnext_matches_transformers_dinov3_convnext():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ConvNextModel"):
        pytest.skip("transformers has no DINOv3ConvNextModel")
    from dino.models.convnext import ConvNeXt

    torch.manual_seed(0)
    ours = ConvNeXt(depths=(1, 2, 1, 1), dims=(8, 16, 32, 64))
    ours.init_weights()
    with torch.no_grad():
        for tensor in ours.parameters():  # no identity LayerNorms or 1e-6 LayerScale: every term counts
            tensor.add_(torch.randn_like(tensor) * 0.2)
    ours.eval()
    renames = {
        "dwconv": "depthwise_conv",
        "norm": "layer_norm",
        "pwconv1": "pointwise_conv1",
        "pwconv2": "pointwise_conv2",
        "gamma": "gamma",
    }
    mapped = {}
    for key, value in ours.state_dict().items():
        parts = key.split(".")
        if parts[0] == "downsample_layers":
            mapped[f"model.stages.{parts[1]}.downsample_layers.{'.'.join(parts[2:])}"] = value
        elif parts[0] == "stages":
            mapped[
                f"model.stages.{parts[1]}.layers.{parts[2]}.{renames[parts[3]]}" + "".join("." + p for p in parts[4:])
            ] = value
        elif parts[0] == "norm":
            mapped[f"layer_norm.{parts[1]}"] = value
    config = transformers.DINOv3ConvNextConfig(depths=[1, 2, 1, 1], hidden_sizes=[8, 16, 32, 64])
    theirs = transformers.DINOv3ConvNextModel(config).eval()
    theirs.load_state_dict(mapped, strict=True)
    for size in [(64, 64), (64, 96), (70, 100)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = theirs(pixel_values=x).last_hidden_state
            out = ours.forward_features(x)
        torch.testing.assert_close(
            torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], 1), expected, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("kind", ["S+/16", "ConvNeXt"])
def test_to_transformers_loads_strictly_and_gives_our_outputs(kind):
    """`dino.models.dinov3.to_transformers`: what an HF export of a v3 model writes (config + weights)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip("transformers < 4.56 has no DINOv3")
    from dino.models.convnext import ConvNeXt
    from dino.models.dinov3 import to_transformers

    if kind == "ConvNeXt":
        ours = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
        ours.init_weights()
    else:
        ours = build_backbone_from_state_dict(official_v3_vit_state_dict(depth=2, swiglu_hidden=swiglu_hidden(384, 6)))
    ours.eval()
    config, state = to_transformers(ours)
    model_type = config.pop("model_type")
    config.pop("architectures")
    config_cls = transformers.DINOv3ConvNextConfig if model_type == "dinov3_convnext" else transformers.DINOv3ViTConfig
    model_cls = transformers.DINOv3ConvNextModel if model_type == "dinov3_convnext" else transformers.DINOv3ViTModel
    theirs = model_cls(config_cls(**config)).eval()
    theirs.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = theirs(pixel_values=x).last_hidden_state
        out = ours.forward_features(x)
    got = torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if kind != "ConvNeXt":
        ours.blocks[0].attn.qkv.bias_mask.fill_(1.0)
        with pytest.raises(ValueError, match="k bias"):
            to_transformers(ours)
