"""DINOv3 in the inference tools: the fast copy, `dino extract / search / duplicates` and `dino export`.

Tiny random models written in the official key layout (`official_v3_vit_state_dict` of test_models_v3), loaded the
way users load a release; every output is compared with the eager model (fp32 at 1e-5, bf16 / int8 by cosine).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino.cli import dispatch
from dino.errors import UserError
from dino.hub import build_backbone_from_state_dict
from dino.inference.fast import EagerInference, InferenceViT, optimize_for_inference
from dino.models.convnext import ConvNeXt
from test_models_v3 import official_v3_vit_state_dict, swiglu_hidden

ATOL = 1e-5
DIM, HEADS = 64, 4  # head_dim 16: four RoPE periods per axis
SIZES = [(64, 64), (48, 80), (70, 90)]  # square, non-square, not a multiple of 16 (floored, as the model does)


def v3_model(**kwargs):
    params = dict(dim=DIM, heads=HEADS)
    params.update(kwargs)
    sd = official_v3_vit_state_dict(**params)
    return build_backbone_from_state_dict(sd).eval(), sd


def tiny_convnext():
    torch.manual_seed(0)
    model = ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64))
    model.init_weights()
    for block in model.modules():  # LayerScale away from its 1e-6 init, so the blocks matter
        if getattr(block, "gamma", None) is not None:
            block.gamma.data.uniform_(0.5, 1.5)
    return model.eval()


V3_CASES = {
    "S/16 width": dict(dim=384, heads=6),
    "S+ SwiGLU": dict(swiglu_hidden=swiglu_hidden(DIM, 6)),
    "local_cls_norm": dict(local_cls_norm=True),
}


@pytest.mark.parametrize("case", list(V3_CASES))
@pytest.mark.parametrize("matmul_patch_embed", [True, False])
def test_fast_v3_equals_the_eager_model(case, matmul_patch_embed):
    model, _ = v3_model(**V3_CASES[case])
    fast = optimize_for_inference(model, matmul_patch_embed=matmul_patch_embed)
    assert isinstance(fast, InferenceViT) and fast.rope
    for size in SIZES:
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = model.forward_features(images)
            got = fast.forward_features(images)
            again = fast.forward_features(images)  # the cached tables of this size
            cls = fast(images)  # [CLS]-only last block
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
            assert got[key].shape == expected[key].shape, key
            torch.testing.assert_close(got[key], expected[key], atol=ATOL, rtol=0)
        torch.testing.assert_close(cls, expected["x_norm_clstoken"], atol=ATOL, rtol=0)
        torch.testing.assert_close(again["x_norm_patchtokens"], got["x_norm_patchtokens"], atol=0, rtol=0)
    assert len(fast._rope_cache) == len(SIZES)  # one table pair per input size


def test_fast_v3_untied_cls_norm_and_k_bias_mask():
    """An untied `cls_norm` normalises [CLS] and storage tokens; the k third of the qkv bias stays masked."""
    sd = official_v3_vit_state_dict(dim=DIM, heads=HEADS)
    g = torch.Generator().manual_seed(3)
    sd["cls_norm.weight"], sd["cls_norm.bias"] = (
        1 + 0.3 * torch.randn(DIM, generator=g),
        0.3 * torch.randn(DIM, generator=g),
    )
    model = build_backbone_from_state_dict(sd).eval()
    assert model.cls_norm is not None
    fast = optimize_for_inference(model)
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        expected, got = model.forward_features(images), fast.forward_features(images)
        torch.testing.assert_close(fast(images), expected["x_norm_clstoken"], atol=ATOL, rtol=0)
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
        torch.testing.assert_close(got[key], expected[key], atol=ATOL, rtol=0)
    bias = fast.blocks[0].qkv.bias
    assert torch.all(bias[DIM : 2 * DIM] == 0) and torch.equal(bias[:DIM], sd["blocks.0.attn.qkv.bias"][:DIM])
    assert sd["blocks.0.attn.qkv.bias"][DIM : 2 * DIM].abs().max() > 0.1  # the file's k bias is not zero: really masked


def test_fast_v3_bf16_and_int8_stay_close():
    model, _ = v3_model()
    images = torch.randn(4, 3, 64, 80)
    with torch.no_grad():
        expected = model(images)
        bf16 = optimize_for_inference(model, dtype=torch.bfloat16)
        assert F.cosine_similarity(bf16(images.bfloat16()).float(), expected).min() > 0.99
        int8 = optimize_for_inference(model, int8=True)
        assert F.cosine_similarity(int8(images), expected).min() > 0.98


def test_convnext_falls_back_to_its_own_forward():
    model = tiny_convnext()
    fast = optimize_for_inference(model)
    assert isinstance(fast, EagerInference)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected, got = model.forward_features(images), fast.forward_features(images)
        torch.testing.assert_close(fast(images), expected["x_norm_clstoken"], atol=0, rtol=0)
    torch.testing.assert_close(got["x_norm_patchtokens"], expected["x_norm_patchtokens"], atol=0, rtol=0)


def test_copy_false_builds_from_the_model_itself():
    """copy=False: no second copy of the weights (what `dino extract` uses); the results are the same."""
    model, _ = v3_model()
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        expected = model(images)
    qkv_weight = model.blocks[0].attn.qkv.weight
    fast = optimize_for_inference(model, copy=False)
    assert fast.source is model and fast.blocks[0].qkv.weight is qkv_weight
    with torch.no_grad():
        torch.testing.assert_close(fast(images), expected, atol=ATOL, rtol=0)


# ---- dino extract / search / duplicates on a v3 checkpoint in the official layout --------------------------------
@pytest.fixture(scope="module")
def v3_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("v3ckpt")
    torch.save(official_v3_vit_state_dict(dim=DIM, heads=HEADS, seed=1), root / "v3.pth")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    Image.open(images / "img0.png").save(images / "copy_of_0.png")
    return root


def test_extract_search_duplicates_on_a_v3_checkpoint(v3_checkpoint, tmp_path):
    from dino.data.datasets import load_image
    from dino.data.transforms import make_eval_transform

    feats = tmp_path / "feats"
    summary = dispatch(
        [
            "extract",
            "--pretrained_weights",
            str(v3_checkpoint / "v3.pth"),
            "--source",
            str(v3_checkpoint / "images"),
            "--output_dir",
            str(feats),
            "--crop_size",
            "32",
            "--resize_size",
            "32",
            "--num_workers",
            "0",
            "--batch_size",
            "4",
            "--device",
            "cpu",
            "--progress",
            "false",
        ]
    )
    assert summary["num_features"] == 6 and summary["dim"] == DIM
    features = np.load(feats / "features.npy")
    paths = (feats / "paths.txt").read_text().splitlines()
    model = build_backbone_from_state_dict(official_v3_vit_state_dict(dim=DIM, heads=HEADS, seed=1)).eval()
    transform = make_eval_transform(32, 32)
    with torch.no_grad():
        expected = F.normalize(model(torch.stack([transform(load_image(p)) for p in paths])), dim=-1).numpy()
    np.testing.assert_allclose(features, expected, atol=ATOL)
    outside = tmp_path / "query.png"
    Image.open(v3_checkpoint / "images" / "img3.png").save(outside)  # not in the index: embedded again
    result = dispatch(
        [
            "search",
            "--features_dir",
            str(feats),
            "--queries",
            str(outside),
            "--k",
            "1",
            "--output_dir",
            str(tmp_path / "search"),
            "--device",
            "cpu",
            "--contact_sheet",
            "none",
        ]
    )
    assert result["results"][0][0][0].endswith("img3.png") and result["results"][0][0][1] > 0.9999
    dup = dispatch(
        ["duplicates", "--features_dir", str(feats), "--threshold", "0.9999", "--output", str(tmp_path / "d.csv")]
    )
    assert dup["num_pairs"] == 1 and {p.rsplit("/", 1)[-1] for p in dup["pairs"][0][:2]} == {
        "img0.png",
        "copy_of_0.png",
    }


# ---- dino export ---------------------------------------------------------------------------------------------------
def test_onnx_v3_and_convnext_match_onnxruntime_at_several_sizes(tmp_path):
    pytest.importorskip("onnxruntime")
    from dino.inference.export.onnx import export_onnx, run_onnx, verify_onnx

    vit, _ = v3_model(swiglu_hidden=swiglu_hidden(DIM, 6))
    for name, model in (("vit", vit), ("convnext", tiny_convnext())):
        path = export_onnx(model, tmp_path / f"{name}.onnx", image_size=64)
        assert verify_onnx(model, path, 64, atol=ATOL) <= ATOL  # 64², 32², 128², 32×96, 72×79
        images = torch.randn(3, 3, 48, 80)  # batch and a size of its own
        cls, patches = run_onnx(path, images.numpy())
        with torch.no_grad():
            expected = model.forward_features(images)
        np.testing.assert_allclose(cls, expected["x_norm_clstoken"].numpy(), atol=ATOL)
        np.testing.assert_allclose(patches, expected["x_norm_patchtokens"].numpy(), atol=ATOL)


def test_hf_export_v3_round_trips_through_transformers(tmp_path):
    pytest.importorskip("transformers")
    from dino.inference.export.hf import export_hf, verify_hf

    vit, _ = v3_model(swiglu_hidden=swiglu_hidden(DIM, 6))
    for name, model in (("vit", vit), ("convnext", tiny_convnext())):
        folder = export_hf(model, tmp_path / name, image_size=64)
        check = verify_hf(model, folder, image_size=64, atol=ATOL)
        assert all(diff <= ATOL for diff in check["sizes"].values()) and len(check["sizes"]) == 2
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    assert config["model_type"] == "dinov3_vit" and config["image_size"] == 64


def test_hf_export_bakes_the_position_embedding_for_image_size(tmp_path):
    """v2: exact at the baked size; at another, transformers' own resize differs and the result says so."""
    pytest.importorskip("transformers")
    from dino.inference.export.hf import export_hf, verify_hf
    from dino.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 14, img_size=56, depth=2, init_values=1.0).eval()
    with torch.no_grad():
        model.pos_embed.normal_(std=0.5)  # a position embedding that matters, so resizing it shows
    folder = export_hf(model, tmp_path / "hf", image_size=28)
    check = verify_hf(model, folder, image_size=28)
    assert check["max_abs_diff"] <= 1e-4 and list(check["sizes"]) == ["28x28", "14x14"]
    assert check["sizes"]["14x14"] > 1e-3 and "28x28" in check["note"] and "--image_size" in check["note"]
    assert json.loads((folder / "config.json").read_text())["image_size"] == 28
    # unbaked: exact at the stored 56², not at 28² (what the issue measured at 224² for dinov2_vits14)
    plain = verify_hf(model, export_hf(model, tmp_path / "plain"))
    assert plain["max_abs_diff"] <= 1e-4 and list(plain["sizes"]) == ["56x56", "42x42"]


def test_export_cli_on_v3(v3_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    weights = str(v3_checkpoint / "v3.pth")
    result = dispatch(
        [
            "export",
            "--pretrained_weights",
            weights,
            "--format",
            "onnx",
            "--output",
            str(tmp_path / "m.onnx"),
            "--image_size",
            "48",
        ]
    )
    assert result["max_abs_diff"] <= 1e-4
    with pytest.raises(UserError, match=r"GGUF .*--format onnx or --format hf") as error:
        dispatch(["export", "--pretrained_weights", weights, "--format", "gguf", "--output", str(tmp_path / "m.gguf")])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "m.gguf").exists()


# ---- the extraction process's memory levers ---------------------------------------------------------------------
@pytest.mark.parametrize("size", [(256, 256), (300, 200), (199, 333), (36, 40)])
def test_eval_transform_without_torchvision_is_bit_identical(size):
    from dino.data.transforms import make_eval_transform
    from dino.inference.extract import EvalTransform

    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    for resize, crop in ((256, 224), (32, 28)):
        assert torch.equal(EvalTransform(resize, crop)(image), make_eval_transform(resize, crop)(image))
    assert EvalTransform(64, 56).min_decode_side == 64


def test_extraction_imports_no_torchvision(v3_checkpoint, tmp_path):
    """torchvision's import pulls in torch._dynamo (~170 MB resident): `dino extract` does without it."""
    import subprocess
    import sys

    code = (
        "import sys; from dino.cli import dispatch; dispatch(['extract', '--pretrained_weights', sys.argv[1], "
        "'--source', sys.argv[2], '--output_dir', sys.argv[3], '--crop_size', '32', '--num_workers', '0', "
        "'--device', 'cpu', '--progress', 'false']); print('torchvision' in sys.modules)"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(v3_checkpoint / "v3.pth"),
            str(v3_checkpoint / "images"),
            str(tmp_path / "feats"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_merged_npy_is_streamed_from_the_chunks(tmp_path):
    from dino.inference.extract import ExtractionSettings, merge_chunks, write_path_list

    chunks = tmp_path / "chunks"
    chunks.mkdir()
    rng = np.random.default_rng(0)
    parts = [
        rng.standard_normal((3, 5)).astype(np.float32),
        np.zeros((0, 0), np.float32),
        rng.standard_normal((2, 5)).astype(np.float32),
    ]
    for index, part in enumerate(parts):
        np.save(chunks / f"{index:05d}.npy", part)
        write_path_list(chunks / f"{index:05d}.txt", [f"img{index}_{i}" for i in range(len(part))])
    summary = merge_chunks(tmp_path, len(parts), ExtractionSettings())
    merged = np.load(tmp_path / "features.npy")
    np.testing.assert_array_equal(merged, np.concatenate([parts[0], parts[2]]))
    assert summary["num_features"] == 5 and summary["dim"] == 5 and merged.dtype == np.float32
