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


# the position-embedding settings of the official models: DINO v1 / DINOv2 hub (offset 0.1), DINOv2 with
# registers (offset 0, antialias), and offset 0 without antialias
POS_MODES = [
    dict(interpolate_offset=0.1, interpolate_antialias=False),
    dict(interpolate_offset=0.0, interpolate_antialias=True),
    dict(interpolate_offset=0.0, interpolate_antialias=False),
]


@pytest.mark.parametrize("mode", POS_MODES, ids=["offset", "antialias", "plain"])
@pytest.mark.parametrize("side", [7, 37])
def test_resize_matrices_match_f_interpolate(mode, side):
    import torch.nn.functional as F

    from dino.inference.export.onnx import bicubic_resize_matrix

    offset, antialias = mode["interpolate_offset"], mode["interpolate_antialias"]
    torch.manual_seed(0)
    grid = torch.randn(1, 3, side, side)
    for height, width in [
        (1, 1),
        (2, 5),
        (side - 2, side - 2),
        (side, side),
        (side, side + 1),
        (side + 3, side),
        (side + 9, side + 9),
        (3 * side, 2 * side),
    ]:
        if offset:
            expected = F.interpolate(
                grid,
                scale_factor=((height + offset) / side, (width + offset) / side),
                mode="bicubic",
                antialias=antialias,
            )
        else:
            expected = F.interpolate(grid, size=(height, width), mode="bicubic", antialias=antialias)
        rows = bicubic_resize_matrix(height, side, offset, antialias)
        cols = bicubic_resize_matrix(width, side, offset, antialias)
        assert rows.shape == (height, side) and cols.shape == (width, side)
        resized = torch.einsum("ia,cab,jb->cij", rows, grid[0], cols)
        # float rounding only: the source coordinates are fp32 in PyTorch too (|grid| ≤ ~4 here)
        torch.testing.assert_close(resized, expected[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", POS_MODES, ids=["offset", "antialias", "plain"])
def test_resized_position_grid_matches_the_model(mode):
    from dino.inference.export.onnx import resize_position_grid

    model = tiny_model(**mode)  # 3×3 grid
    with torch.no_grad():
        model.pos_embed.normal_()  # away from the small init, so a wrong weight shows
    grid = model.pos_embed[0, 1:].reshape(3, 3, -1)
    for height, width in [(1, 1), (2, 4), (3, 3), (3, 5), (5, 3), (6, 6)]:
        expected = model.interpolate_pos_encoding(height * width + 1, height * 14, width * 14)[0, 1:]
        got = resize_position_grid(grid, height, width, mode["interpolate_offset"], mode["interpolate_antialias"])
        if (height, width) == (3, 3):  # the model's shortcut: the stored grid as it is
            assert torch.equal(got, expected)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)],
    ids=["v2", "registers"],
)
def test_onnx_matches_pytorch_with_dynamic_batch_and_size(tmp_path, kwargs):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dino.inference.export.onnx import export_onnx, onnx_has_dynamic_size, run_onnx, verify_onnx

    model = tiny_model(**kwargs)  # stored grid 3×3 (42 px)
    with torch.no_grad():
        model.pos_embed.normal_()
    path = export_onnx(model, tmp_path / "m.onnx", image_size=28)  # the example is neither of the sizes below but one
    assert onnx_has_dynamic_size(path)
    op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Resize" not in op_types and "Einsum" in op_types
    # smaller, stored (the model's no-interpolation shortcut), larger, non-square both ways; batch 1 and 3
    for batch, (height, width) in [(3, (28, 28)), (1, (42, 42)), (2, (70, 70)), (1, (28, 56)), (2, (56, 42))]:
        images = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected = model.forward_features(images)
        cls, patches = run_onnx(path, images.numpy(), threads=1)
        assert cls.shape == (batch, 192) and patches.shape == (batch, height * width // 196, 192)
        assert np.abs(cls - expected["x_norm_clstoken"].numpy()).max() <= 1e-4
        assert np.abs(patches - expected["x_norm_patchtokens"].numpy()).max() <= 1e-4
    assert verify_onnx(model, path, 28) <= 1e-4  # example, stored, larger and non-square sizes


@pytest.mark.parametrize("registers", [0, 2])
def test_onnx_fixed_size_matches_pytorch_with_dynamic_batch(tmp_path, registers):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dino.errors import UserError
    from dino.inference.export.onnx import export_onnx, onnx_has_dynamic_size, run_onnx, verify_onnx

    model = tiny_model(num_register_tokens=registers)
    path = export_onnx(model, tmp_path / "m.onnx", image_size=28, dynamic_size=False)  # baked, interpolated embedding
    assert not onnx_has_dynamic_size(path)
    for batch in (1, 3):
        images = torch.randn(batch, 3, 28, 28)
        with torch.no_grad():
            expected = model.forward_features(images)
        cls, patches = run_onnx(path, images.numpy(), threads=1)
        assert cls.shape == (batch, 192) and patches.shape == (batch, 4, 192)
        assert np.abs(cls - expected["x_norm_clstoken"].numpy()).max() <= 1e-4
        assert np.abs(patches - expected["x_norm_patchtokens"].numpy()).max() <= 1e-4
    assert verify_onnx(model, path, 28) <= 1e-4
    with torch.no_grad():
        model.pos_embed.add_(torch.randn_like(model.pos_embed))  # (a constant shift would vanish in LayerNorm)
    with pytest.raises(UserError, match="differs from PyTorch"):
        verify_onnx(model, path, 28)


@pytest.mark.parametrize("ftype", ["f32", "f16"])
def test_gguf_read_back_holds_every_tensor(tmp_path, ftype):
    pytest.importorskip("gguf")
    from dino.inference.export.gguf import export_gguf, read_gguf, verify_gguf

    model = tiny_model(num_register_tokens=4)
    path = export_gguf(model, tmp_path / "m.gguf", ftype=ftype, qkv_layout="both")
    assert (
        verify_gguf(model, path, ftype=ftype, qkv_layout="both") == 7 + 2 * 20
    )  # 5 embeddings + 2 layernorm; 20 per block (split and fused qkv)
    metadata, tensors = read_gguf(path)
    assert metadata == {
        "hidden_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "num_classes": 0,
        "patch_size": 14,
        "img_size": 42,
        "ftype": {"f32": 0, "f16": 1}[ftype],
        "num_register_tokens": 4,
    }
    state = model.state_dict()
    # spot checks against our own names, independent of the exporter's mapping
    qkv = state["blocks.1.attn.qkv.weight"].numpy()
    np.testing.assert_array_equal(
        tensors["encoder.layer.1.attention.attention.key.weight"],
        qkv[192:384].astype(tensors["encoder.layer.1.attention.attention.key.weight"].dtype),
    )
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


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(ffn_layer="swiglu"), dict(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)],
)
def test_hf_export_matches_transformers(tmp_path, kwargs):
    pytest.importorskip("transformers")
    from dino.inference.export.hf import export_hf, verify_hf

    model = tiny_model(**kwargs)
    export_hf(model, tmp_path / "hf")
    assert verify_hf(model, tmp_path / "hf")["max_abs_diff"] <= 1e-4


def test_export_cli_gguf_and_hf_state_dict(tmp_path):
    pytest.importorskip("gguf")
    model = tiny_model()
    save_backbone(model, tmp_path / "tiny.pth")
    result = dispatch(
        [
            "export",
            "--pretrained_weights",
            str(tmp_path / "tiny.pth"),
            "--format",
            "gguf",
            "--output",
            str(tmp_path / "m.gguf"),
        ]
    )
    assert result["tensors_verified"] > 0 and (tmp_path / "m.gguf").stat().st_size > 0


def test_hf_state_dict_splits_qkv_in_q_k_v_order():
    from dino.inference.export.hf import hf_state_dict

    model = tiny_model()
    state = hf_state_dict(model)
    qkv = model.blocks[0].attn.qkv
    for index, name in enumerate(("query", "key", "value")):
        torch.testing.assert_close(
            state[f"encoder.layer.0.attention.attention.{name}.weight"], qkv.weight[index * 192 : (index + 1) * 192]
        )
        torch.testing.assert_close(
            state[f"encoder.layer.0.attention.attention.{name}.bias"], qkv.bias[index * 192 : (index + 1) * 192]
        )
