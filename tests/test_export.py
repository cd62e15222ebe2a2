"""ONNX, GGUF and Hugging Face exports reproduce our features (fp32: max abs diff ≤ 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dino.cli import dispatch
from dino.hub import save_backbone
from dino.models import build_backbone


def tiny_model(**kwargs):
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 14, img_size=42, depth=2, init_values=1.0, **kwargs).eval()
    for block in model.blocks:  # LayerScale away from 1, so a mistake in its export shows
        block.ls1.gamma.data.uniform_(0.5, 1.5)
        block.ls2.gamma.data.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("registers", [0, 2])
def test_onnx_matches_pytorch_with_dynamic_batch(tmp_path, registers):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dino.inference.export.onnx import export_onnx, run_onnx

    model = tiny_model(num_register_tokens=registers)
    path = export_onnx(model, tmp_path / "m.onnx", image_size=28)  # not the stored 42: the baked embedding is interpolated
    for batch in (1, 3):
        images = torch.randn(batch, 3, 28, 28)
        with torch.no_grad():
            expected = model.forward_features(images)
        cls, patches = run_onnx(path, images.numpy())
        assert cls.shape == (batch, 192) and patches.shape == (batch, 4, 192)
        assert np.abs(cls - expected["x_norm_clstoken"].numpy()).max() <= 1e-4
        assert np.abs(patches - expected["x_norm_patchtokens"].numpy()).max() <= 1e-4


@pytest.mark.parametrize("ftype", ["f32", "f16"])
def test_gguf_read_back_holds_every_tensor(tmp_path, ftype):
    pytest.importorskip("gguf")
    from dino.inference.export.gguf import export_gguf, read_gguf, verify_gguf

    model = tiny_model(num_register_tokens=4)
    path = export_gguf(model, tmp_path / "m.gguf", ftype=ftype)
    assert verify_gguf(model, path, ftype=ftype) == 7 + 2 * 20  # 5 embeddings + 2 layernorm; 20 per block (split and fused qkv)
    metadata, tensors = read_gguf(path)
    assert metadata == {"hidden_size": 192, "num_hidden_layers": 2, "num_attention_heads": 3, "num_classes": 0,
                        "patch_size": 14, "img_size": 42, "ftype": {"f32": 0, "f16": 1}[ftype], "num_register_tokens": 4}
    state = model.state_dict()
    # spot checks against our own names, independent of the exporter's mapping
    qkv = state["blocks.1.attn.qkv.weight"].numpy()
    np.testing.assert_array_equal(tensors["encoder.layer.1.attention.attention.key.weight"], qkv[192:384].astype(tensors["encoder.layer.1.attention.attention.key.weight"].dtype))
    np.testing.assert_array_equal(tensors["encoder.layer.0.layer_scale2.lambda1"], state["blocks.0.ls2.gamma"].numpy())
    np.testing.assert_array_equal(tensors["embeddings.position_embeddings"], state["pos_embed"].numpy())
    assert tensors["embeddings.patch_embeddings.projection.bias"].shape == (1, 192, 1, 1)
    assert tensors["embeddings.patch_embeddings.projection.bias"].dtype == np.float32
    assert tensors["encoder.layer.0.mlp.fc1.weight"].dtype == (np.float16 if ftype == "f16" else np.float32)
    assert "embeddings.mask_token" not in tensors


def test_gguf_verify_detects_a_changed_tensor(tmp_path):
    pytest.importorskip("gguf")
    from dino.errors import UserError
    from dino.inference.export.gguf import export_gguf, verify_gguf

    model = tiny_model()
    path = export_gguf(model, tmp_path / "m.gguf")
    with torch.no_grad():
        model.blocks[0].mlp.fc2.bias[0] += 1
    with pytest.raises(UserError, match="mlp.fc2.bias"):
        verify_gguf(model, path)


@pytest.mark.parametrize("kwargs", [dict(), dict(ffn_layer="swiglu"), dict(num_register_tokens=4, interpolate_offset=0.0,
                                                                               interpolate_antialias=True)])
def test_hf_export_matches_transformers(tmp_path, kwargs):
    pytest.importorskip("transformers")
    from dino.inference.export.hf import export_hf, verify_hf

    model = tiny_model(**kwargs)
    export_hf(model, tmp_path / "hf")
    assert verify_hf(model, tmp_path / "hf") <= 1e-4


def test_export_cli_gguf_and_hf_state_dict(tmp_path):
    pytest.importorskip("gguf")
    model = tiny_model()
    save_backbone(model, tmp_path / "tiny.pth")
    result = dispatch(["export", "--pretrained_weights", str(tmp_path / "tiny.pth"), "--format", "gguf",
                       "--output", str(tmp_path / "m.gguf")])
    assert result["tensors_verified"] > 0 and (tmp_path / "m.gguf").stat().st_size > 0


def test_hf_state_dict_splits_qkv_in_q_k_v_order():
    from dino.inference.export.hf import hf_state_dict

    model = tiny_model()
    state = hf_state_dict(model)
    qkv = model.blocks[0].attn.qkv
    for index, name in enumerate(("query", "key", "value")):
        torch.testing.assert_close(state[f"encoder.layer.0.attention.attention.{name}.weight"], qkv.weight[index * 192:(index + 1) * 192])
        torch.testing.assert_close(state[f"encoder.layer.0.attention.attention.{name}.bias"], qkv.bias[index * 192:(index + 1) * 192])
