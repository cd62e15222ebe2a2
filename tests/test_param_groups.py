"""Optimizer param groups (weight decay, layer-wise lr decay, last layer) and gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from dino.train.clip import clip_grad_norm_per_module, clip_gradients_per_parameter
from dino.train.param_groups import apply_schedules, block_index, build_param_groups


class TinyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(dim))


class TinyViT(nn.Module):
    """Same parameter names as our ViT (and the official ones), 3 blocks of width 4."""

    def __init__(self, dim: int = 4, depth: int = 3, chunked: bool = False) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=2, stride=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, 2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        blocks = [TinyBlock(dim) for _ in range(depth)]
        if chunked:  # official block_chunks: chunk c pads with Identity so indices stay global
            second_chunk = nn.ModuleList([nn.Identity(), nn.Identity(), blocks[2]])
            self.blocks = nn.ModuleList([nn.ModuleList(blocks[:2]), second_chunk])
        else:
            self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)


class TinyStudent(nn.Module):
    def __init__(self, chunked: bool = False) -> None:
        super().__init__()
        self.backbone = TinyViT(chunked=chunked)
        self.dino_head = nn.Module()
        self.dino_head.mlp = nn.Linear(4, 4)
        self.dino_head.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(4, 6, bias=False))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def settings_by_name(groups) -> dict[str, tuple[float, float, bool]]:
    table = {}
    for group in groups:
        assert len(group["names"]) == len(group["params"])
        for name in group["names"]:
            assert name not in table, f"{name} is in two groups"
            table[name] = (group["lr_multiplier"], group["wd_multiplier"], group["is_last_layer"])
    return table


@pytest.mark.parametrize("chunked", [False, True])
def test_layerwise_decay_weight_decay_and_last_layer(chunked):
    model = TinyStudent(chunked=chunked)
    groups = build_param_groups(
        model, layerwise_decay=0.5, patch_embed_lr_mult=0.2, exclude_tokens_from_weight_decay=True
    )
    table = settings_by_name(groups)
    last_block = "backbone.blocks.1.2" if chunked else "backbone.blocks.2"
    first_block = "backbone.blocks.0.0" if chunked else "backbone.blocks.0"
    n = 3  # blocks: multiplier = 0.5 ** (n + 1 - layer_id)

    assert table["backbone.patch_embed.proj.weight"] == (pytest.approx(0.5**4 * 0.2), 1.0, False)
    assert table["backbone.patch_embed.proj.bias"] == (pytest.approx(0.5**4 * 0.2), 0.0, False)
    for token in ("cls_token", "register_tokens", "mask_token", "pos_embed"):
        assert table[f"backbone.{token}"] == (0.5**4, 0.0, False)
    assert table[f"{first_block}.qkv.weight"] == (0.5**3, 1.0, False)
    assert table[f"{first_block}.qkv.bias"] == (0.5**3, 0.0, False)
    assert table[f"{first_block}.norm1.weight"] == (0.5**3, 0.0, False)
    assert table[f"{first_block}.ls1.gamma"] == (0.5**3, 0.0, False)
    assert table[f"{last_block}.qkv.weight"] == (0.5**1, 1.0, False)
    assert table["backbone.norm.weight"] == (1.0, 0.0, False)
    assert table["dino_head.mlp.weight"] == (1.0, 1.0, False)
    last_layer = [name for name in table if name.startswith("dino_head.last_layer.")]
    assert len(last_layer) == 2 and all(table[name][2] for name in last_layer)
    assert not any(name.startswith("frozen.") for name in table)

    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))  # identical multipliers share one group
    assert n + 2 <= len(groups) < n_trainable


def test_official_rule_decays_tokens_by_default():
    """DINO v1 / DINOv2 exempt only biases, norms and LayerScale; the four token tensors are decayed."""
    table = settings_by_name(build_param_groups(TinyViT()))
    for token in ("cls_token", "register_tokens", "mask_token", "pos_embed"):
        assert table[token][1] == 1.0, token
    for exempt in (
        "norm.weight",
        "norm.bias",
        "blocks.0.qkv.bias",
        "blocks.0.norm1.weight",
        "blocks.0.ls1.gamma",
        "patch_embed.proj.bias",
    ):
        assert table[exempt][1] == 0.0, exempt
    assert table["blocks.0.qkv.weight"][1] == 1.0 and table["patch_embed.proj.weight"][1] == 1.0


@pytest.mark.parametrize(
    "preset, exempt",
    [
        ("dino_vits16", False),
        ("dinov2_vits14", False),
        ("dinov2_vitl14", False),
        ("dinov2_vitg14", False),
        ("demo", True),
    ],
)
def test_presets_choose_the_token_weight_decay_rule(preset, exempt):
    from dino.config import compose
    from dino.train.loop import build_optimizer

    cfg = compose(f"train/{preset}")
    assert cfg.optim.exclude_tokens_from_weight_decay is exempt
    optimizer = build_optimizer(cfg, TinyStudent())
    wd = {name: group["wd_multiplier"] for group in optimizer.param_groups for name in group["names"]}
    assert wd["backbone.cls_token"] == wd["backbone.pos_embed"] == wd["backbone.mask_token"] == (0.0 if exempt else 1.0)
    assert wd["backbone.norm.weight"] == 0.0 and wd["backbone.blocks.0.qkv.weight"] == 1.0


def test_block_index_parses_prefixed_and_chunked_names():
    assert block_index("backbone.blocks.3.attn.qkv.weight") == 3
    assert block_index("blocks.11.mlp.fc1.bias") == 11
    assert block_index("_fsdp_wrapped_module.blocks.0.3.norm1.weight") == 3
    assert block_index("backbone.norm.weight") is None
    assert block_index("dino_head.mlp.0.weight") is None


def test_apply_schedules_sets_lr_and_weight_decay_per_group():
    model = TinyStudent()
    groups = build_param_groups(model, layerwise_decay=0.5)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    apply_schedules(optimizer, lr=0.1, wd=0.04, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        expected_lr = 0.0 if group["is_last_layer"] else 0.1 * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(0.04 * group["wd_multiplier"])
    lrs = {name: g["lr"] for g in optimizer.param_groups for name in g["names"]}
    assert lrs["backbone.blocks.0.qkv.weight"] == pytest.approx(0.1 * 0.125)
    assert lrs["dino_head.mlp.weight"] == pytest.approx(0.1)


# ---------------------------------------------------------------- clipping


def set_gradients(module: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    for name, param in module.named_parameters():
        param.grad = grads[name].clone() if name in grads else None


def test_clip_gradients_per_parameter_is_dino_v1():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1, bias=False))
    grads = {
        "0.weight": torch.tensor([[6.0, 0.0], [0.0, 8.0]]),  # norm 10 -> clipped to 3
        "0.bias": torch.tensor([0.6, 0.8]),  # norm 1 -> untouched
    }  # "1.weight" has no gradient: skipped
    set_gradients(model, grads)
    norms = clip_gradients_per_parameter(model, max_norm=3.0)
    assert norms == pytest.approx([10.0, 1.0])
    expected_weight = grads["0.weight"] * (3.0 / (10.0 + 1e-6))
    torch.testing.assert_close(model[0].weight.grad, expected_weight)
    assert torch.equal(model[0].bias.grad, grads["0.bias"])
    assert model[1].weight.grad is None
    assert model[0].weight.grad.norm().item() <= 3.0


def test_clip_grad_norm_per_module_is_dinov2():
    backbone, head = nn.Linear(2, 2), nn.Linear(2, 1)
    set_gradients(backbone, {"weight": torch.tensor([[3.0, 0.0], [0.0, 0.0]]), "bias": torch.tensor([0.0, 4.0])})
    set_gradients(head, {"weight": torch.tensor([[1.0, 1.0]]), "bias": torch.tensor([0.0])})
    norms = clip_grad_norm_per_module({"backbone": backbone, "dino_head": head}, max_norm=2.0)
    assert norms["backbone"].item() == pytest.approx(5.0)
    assert norms["dino_head"].item() == pytest.approx(math.sqrt(2))
    # Backbone: one global norm 5 -> 2, direction kept (both tensors scaled by the same factor).
    scale = 2.0 / (5.0 + 1e-6)
    torch.testing.assert_close(backbone.weight.grad, torch.tensor([[3.0 * scale, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(backbone.bias.grad, torch.tensor([0.0, 4.0 * scale]))
    # Head is below the limit and is not affected by the backbone's larger norm.
    assert torch.equal(head.weight.grad, torch.tensor([[1.0, 1.0]]))
