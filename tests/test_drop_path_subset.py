"""Stochastic depth by sample subset: dropped samples skip the branch (no FLOPs), kept ones are rescaled."""

import pytest
import torch

from dino.models.vision_transformer import VisionTransformer, drop_add_residual_subset
from dino.train.throughput import count_flops


def test_subset_residual_adds_the_rescaled_branch_to_the_kept_samples_only():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 4)
    calls = []

    def branch(t):
        calls.append(t.shape[0])
        return 2 * t + 1

    torch.manual_seed(1)
    out = drop_add_residual_subset(x, branch, 0.25)
    torch.manual_seed(1)
    kept = torch.randperm(8)[:6]  # ⌊8 · 0.75⌋ samples, as the function draws them
    assert calls == [6]
    expected = x.clone()
    expected[kept] += (2 * x[kept] + 1) * (8 / 6)
    torch.testing.assert_close(out, expected)
    assert drop_add_residual_subset(x, branch, 0.99).shape == x.shape and calls[-1] == 1  # at least one sample


def test_subset_mode_saves_the_dropped_fraction_of_block_flops_and_keeps_gradients_finite():
    def model(mode):
        torch.manual_seed(0)
        vit = VisionTransformer(
            img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, drop_path_rate=0.5, drop_path_uniform=True
        )
        vit.set_drop_path_mode(mode)
        return vit.train()

    x = torch.randn(8, 3, 32, 32)
    flops = {}
    for mode in ("mask", "subset"):
        vit = model(mode)
        with count_flops() as counted:
            vit(x).sum().backward()
        flops[mode] = counted()
        assert all(torch.isfinite(p.grad).all() for p in vit.parameters() if p.grad is not None)
    # half of the samples skip every branch: the blocks' FLOPs halve, the patch embedding's stay
    assert flops["subset"] < 0.6 * flops["mask"]
    evaluation = model("subset").eval()
    with torch.no_grad():  # no stochastic depth outside training: the modes agree
        torch.testing.assert_close(evaluation(x), model("mask").eval()(x))


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="subset"):
        VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4).set_drop_path_mode("drop")
