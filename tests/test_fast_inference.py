"""The inference copy computes the training model's function: fp32 within 1e-4, int8 / bf16 within cosine 0.99."""

from __future__ import annotations

import copy

import pytest
import torch

import dino.inference.fast as fast_module
from dino.inference.fast import feature_cosine, optimize_for_inference
from dino.models import build_backbone


def tiny_model(**kwargs):
    params = dict(img_size=42, depth=2, init_values=1.0)
    params.update(kwargs)
    model = build_backbone("vit_tiny", 14, **params).eval()
    for block in model.blocks:
        if hasattr(block.ls1, "gamma"):  # LayerScale away from 1, so folding it is really tested
            block.ls1.gamma.data.uniform_(0.5, 1.5)
            block.ls2.gamma.data.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True),
        dict(init_values=None, use_mask_token=False),  # DINO v1: no LayerScale
        dict(ffn_layer="swiglu"),
    ],
)
@pytest.mark.parametrize("matmul_patch_embed", [True, False])
def test_fp32_matches_the_model(kwargs, matmul_patch_embed):
    model = tiny_model(**kwargs)
    fast = optimize_for_inference(model, matmul_patch_embed=matmul_patch_embed)
    for size in ((42, 42), (28, 56)):  # the stored grid, and a non-square size that interpolates
        images = torch.randn(3, 3, *size)
        with torch.no_grad():
            expected = model.forward_features(images)
            got = fast.forward_features(images)
            got_again = fast.forward_features(images)  # second call: cached position embedding
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
            assert got[key].shape == expected[key].shape
            if expected[key].numel():
                assert (got[key] - expected[key]).abs().max() <= 1e-4, key
        torch.testing.assert_close(got_again["x_norm_patchtokens"], got["x_norm_patchtokens"])
        torch.testing.assert_close(fast(images), expected["x_norm_clstoken"], atol=1e-4, rtol=0)


def test_source_model_is_left_unchanged():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimize_for_inference(model, int8=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


@pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines
    and "x86" not in torch.backends.quantized.supported_engines,
    reason="no int8 CPU engine",
)
@pytest.mark.parametrize(
    "onednn",
    [
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                not fast_module._HAS_ONEDNN_INT8, reason="PyTorch built without oneDNN int8 linear"
            ),
        ),
        False,
    ],
)
def test_int8_features_stay_close(onednn, monkeypatch):
    monkeypatch.setattr(fast_module, "_HAS_ONEDNN_INT8", onednn)  # False: torch.ao dynamic quantisation
    torch.manual_seed(0)
    model = tiny_model(depth=4)
    images = torch.randn(4, 3, 42, 42)
    int8 = optimize_for_inference(model, int8=True)
    if onednn:  # the Linear layers really are int8
        assert all(isinstance(block._int8["fc1"], fast_module._Int8Linear) for block in int8.blocks)
    else:
        assert any("quantized" in type(m).__module__ for m in int8.modules())
    cosine = feature_cosine(model, int8, images)
    assert 0.99 <= cosine < 1.0
    features = int8.forward_features(images)
    assert features["x_norm_patchtokens"].shape == (4, 9, model.embed_dim)
    with torch.no_grad():  # a copy (packed oneDNN weights re-packed) computes the same features
        torch.testing.assert_close(copy.deepcopy(int8)(images), int8(images))


@pytest.mark.skipif(not fast_module._HAS_ONEDNN_INT8, reason="PyTorch built without oneDNN int8 linear")
def test_static_int8_is_calibrated_close_and_batch_independent():
    torch.manual_seed(0)
    model = tiny_model(depth=4)
    calibration = torch.randn(8, 3, 42, 42)
    images = torch.randn(4, 3, 42, 42)  # held out: not seen by the calibration
    static = optimize_for_inference(model, int8=True, calibration_images=calibration.split(3))
    for block in static.blocks:  # every layer's input range is fixed, and it is the range the inputs really had
        for name, layer in block._int8.items():
            lo, hi = layer.observed_range
            assert lo < 0 < hi, name
            scale, zero_point = layer.input_quantization
            assert scale == pytest.approx((hi - lo) / 255) and zero_point == round(-lo / scale)
    with torch.no_grad():  # fc1 hands fc2 its input as uint8 codes on fc2's grid
        block = static.blocks[0]
        tokens = static.prepare_tokens(images)
        hidden = block._int8["fc1"](
            block.norm2(tokens).reshape(-1, model.embed_dim),
            gelu=True,
            output_quantization=block._int8["fc2"].input_quantization,
        )
        assert hidden.dtype == torch.uint8
        assert 0.99 <= feature_cosine(model, static, images) < 1.0
        # a static range makes an image's features independent of the other images in its batch
        torch.testing.assert_close(static(images[:1]), static(images)[:1], atol=1e-5, rtol=0)
        torch.testing.assert_close(copy.deepcopy(static)(images), static(images))


@pytest.mark.skipif(not fast_module._HAS_ONEDNN_INT8, reason="PyTorch built without oneDNN int8 linear")
def test_calibrate_int8_needs_an_int8_model_and_images():
    with pytest.raises(ValueError, match="int8=True"):
        fast_module.calibrate_int8(optimize_for_inference(tiny_model()), torch.randn(1, 3, 42, 42))
    with pytest.raises(ValueError, match="at least one image"):
        optimize_for_inference(tiny_model(), int8=True, calibration_images=[])


def test_int8_swiglu_falls_back_to_dynamic_quantisation():
    model = tiny_model(ffn_layer="swiglu")
    int8 = optimize_for_inference(model, int8=True)
    assert any("quantized" in type(m).__module__ for m in int8.modules())
    assert feature_cosine(model, int8, torch.randn(2, 3, 42, 42)) >= 0.99


def test_bf16_features_stay_close():
    model = tiny_model()
    images = torch.randn(2, 3, 42, 42)
    fast = optimize_for_inference(model, dtype=torch.bfloat16)
    assert fast.input_dtype is torch.bfloat16 and fast.blocks[0].qkv.weight.dtype is torch.bfloat16
    assert feature_cosine(model, fast, images) >= 0.99


def test_int8_refuses_a_dtype():
    with pytest.raises(ValueError):
        optimize_for_inference(tiny_model(), dtype=torch.bfloat16, int8=True)


@pytest.mark.skipif(not fast_module._HAS_MKLDNN_LINEAR, reason="PyTorch built without oneDNN")
def test_onednn_fused_blocks_match_the_plain_blocks(monkeypatch):
    """The fused oneDNN path (bias, erf GELU and residual adds inside the GEMMs) computes the plain path's function."""
    model = tiny_model()
    fast = optimize_for_inference(model)
    images = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        fused = fast.forward_features(images)["x_norm_patchtokens"]
        assert fast.blocks[0]._packed._cache  # the fused path really ran
        monkeypatch.setattr(fast_module, "_HAS_MKLDNN_LINEAR", False)
        plain = fast.forward_features(images)["x_norm_patchtokens"]
    assert (fused - plain).abs().max() <= 1e-5
    # a changed weight is re-packed, not served stale
    monkeypatch.setattr(fast_module, "_HAS_MKLDNN_LINEAR", True)
    with torch.no_grad():
        fast.blocks[0].mlp.fc1.weight.mul_(2)
        changed = fast.forward_features(images)["x_norm_patchtokens"]
        monkeypatch.setattr(fast_module, "_HAS_MKLDNN_LINEAR", False)
        changed_plain = fast.forward_features(images)["x_norm_patchtokens"]
    assert (changed - changed_plain).abs().max() <= 1e-5
    copy.deepcopy(fast)  # packed oneDNN weights are not copied, they are rebuilt on use
