"""Throughput accounting: FLOPs of a step against a hand count, the peak table, the meter's arithmetic."""

import pytest
import torch

from dino.models.vision_transformer import VisionTransformer
from dino.train.throughput import (
    PeakRate,
    StepFlops,
    ThroughputMeter,
    compute_precision,
    count_flops,
    table_peak_flops,
)


def hand_count_vit_forward(batch, image, patch, dim, depth, mlp_ratio=4):
    """Multiply-adds × 2 of a ViT forward, written out layer by layer (attention included)."""
    patches = (image // patch) ** 2
    tokens = patches + 1  # [CLS]
    hidden = dim * mlp_ratio
    patch_embed = 2 * batch * patches * dim * 3 * patch * patch
    per_block = (
        2 * batch * tokens * dim * 3 * dim  # qkv
        + 2 * batch * tokens * tokens * dim  # q kᵀ (all heads together: dim = heads × head_dim)
        + 2 * batch * tokens * tokens * dim  # attention × v
        + 2 * batch * tokens * dim * dim  # output projection
        + 2 * batch * tokens * dim * hidden * 2
    )  # fc1 + fc2
    attention = 2 * (2 * batch * tokens * tokens * dim)
    return patch_embed, per_block * depth, attention * depth


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_vit_flops_match_hand_count(backend):
    batch, image, patch, dim, depth = 3, 32, 8, 48, 2
    model = VisionTransformer(
        img_size=image, patch_size=patch, embed_dim=dim, depth=depth, num_heads=4, attn_backend=backend
    )
    x = torch.randn(batch, 3, image, image)
    patch_embed, blocks, attention = hand_count_vit_forward(batch, image, patch, dim, depth)

    with torch.no_grad(), count_flops() as forward_flops:
        model(x)
    assert forward_flops() == patch_embed + blocks

    with count_flops() as step_flops:
        model(x).sum().backward()
    # backward: gradient w.r.t. inputs and w.r.t. weights, each as costly as the forward matmul; the image
    # needs no gradient, so the patch embedding's backward is the weight gradient alone
    # a fused attention kernel's backward recomputes q kᵀ: PyTorch counts 5 products there instead of 4
    recompute = attention // 2 if backend == "sdpa" else 0
    assert step_flops() == 3 * blocks + 2 * patch_embed + recompute


def test_step_flops_are_cached_per_crop_layout():
    flops = StepFlops()
    batch = {
        "collated_global_crops": torch.zeros(4, 3, 32, 32),
        "collated_local_crops": torch.zeros(8, 3, 16, 16),
        "n_masked_patches": torch.tensor([5]),
    }
    assert flops.known(batch) is None
    flops.record(batch, 1234)
    assert flops.known(batch) == 1234
    other = dict(batch, n_masked_patches=torch.tensor([5]))
    assert flops.known(other) == 1234  # same shapes, other values
    assert flops.known(dict(batch, collated_local_crops=torch.zeros(8, 3, 24, 24))) is None


def test_peak_table_matches_device_names():
    assert table_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert table_peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.5e12)  # longest fragment wins
    assert table_peak_flops("NVIDIA H200", "tf32") == pytest.approx(494.7e12)
    assert table_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312e12)
    assert table_peak_flops("NVIDIA GeForce RTX 4090", "fp32") == pytest.approx(82.6e12)
    assert table_peak_flops("GAUDI2", "fp32") is None  # no data-sheet value: the caller measures
    assert table_peak_flops("Some Future GPU", "bf16") is None
    assert compute_precision(torch.bfloat16, "cpu") == "bf16"
    assert compute_precision(None, "cpu") == "fp32"


def test_meter_reports_rates_and_names_a_data_bottleneck():
    peak = PeakRate(1e12, "fp32", "test")
    meter = ThroughputMeter(global_batch=64, peak=peak, memory_mb=lambda: 123.0, window=4)
    for _ in range(4):
        metrics = meter.update(data_s=0.01, compute_s=0.99, flops_per_process=5e11)
    assert metrics["images_per_s"] == pytest.approx(64.0)
    assert metrics["mfu"] == pytest.approx(0.5)
    assert metrics["data_wait_fraction"] == pytest.approx(0.01)
    assert metrics["peak_memory_mb"] == 123.0
    assert meter.bottleneck() is None
    for _ in range(4):
        meter.update(data_s=0.5, compute_s=0.5, flops_per_process=5e11)
    assert "data loading is the bottleneck" in meter.bottleneck()
