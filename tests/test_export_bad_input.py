"""Issue 17, `dino export`: an existing output is not silently replaced, --image_size 0 is refused up front, and an
ONNX file fed a size that is not a multiple of the patch crops (as documented) instead of failing in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dino.cli import dispatch
from dino.errors import UserError
from dino.hub import save_backbone
from dino.models import build_backbone


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export") / "tiny.pth"
    save_backbone(build_backbone("vit_tiny", 14, img_size=42, depth=1, init_values=1.0).eval(), path)
    return path


def _export(weights, output, *extra):
    return dispatch(["export", "--pretrained_weights", str(weights), "--output", str(output), *extra])


def test_existing_hf_folder_is_refused_unless_overwrite(weights, tmp_path):
    pytest.importorskip("safetensors")
    folder = tmp_path / "hf"
    folder.mkdir()
    keep = folder / "README.md"
    keep.write_text("mine")
    with pytest.raises(UserError, match="already exists; .* --overwrite"):
        _export(weights, folder, "--format", "hf", "--verify", "false")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"]
    _export(weights, folder, "--format", "hf", "--verify", "false", "--overwrite")
    assert (folder / "config.json").is_file() and keep.read_text() == "mine"


def test_existing_file_is_refused_unless_overwrite(weights, tmp_path):
    pytest.importorskip("onnx")
    target = tmp_path / "model.onnx"
    target.write_bytes(b"precious")
    with pytest.raises(UserError, match="already exists"):
        _export(weights, target, "--format", "onnx", "--verify", "false", "--image_size", "28")
    assert target.read_bytes() == b"precious"
    with pytest.raises(UserError, match="is a folder; the onnx format writes one file"):
        _export(weights, tmp_path, "--format", "onnx", "--verify", "false", "--image_size", "28")


@pytest.mark.parametrize("size", ["0", "-14", "20"])
def test_bad_image_size_is_refused_before_exporting(weights, tmp_path, size):
    with pytest.raises(UserError, match="image_size"):
        _export(weights, tmp_path / "m.onnx", "--format", "onnx", "--image_size", size)
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_crops_sizes_that_are_not_multiples_of_the_patch(weights, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dino.hub import load_backbone
    from dino.inference.export.onnx import run_onnx

    result = _export(weights, tmp_path / "m.onnx", "--format", "onnx", "--image_size", "28")
    assert result["max_abs_diff"] <= 1e-4  # verification includes a cropped size now
    assert "cropped" in result["input_sizes"]
    model = load_backbone(str(weights)).float().eval()
    images = torch.randn(2, 3, 33, 47)  # was: onnxruntime Reshape error
    cls, patches = run_onnx(tmp_path / "m.onnx", images.numpy(), threads=1)
    with torch.no_grad():
        expected = model.forward_features(images[:, :, :28, :42])
    assert patches.shape == (2, 2 * 3, model.embed_dim)
    assert np.abs(cls - expected["x_norm_clstoken"].numpy()).max() <= 1e-4
    assert np.abs(patches - expected["x_norm_patchtokens"].numpy()).max() <= 1e-4
