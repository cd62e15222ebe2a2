"""Every eval / visualisation script accepts a DINOv3 checkpoint with no extra flags (architecture read from the file)."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from test_features import REPO_ROOT, write_train_val
from test_models_v3 import official_v3_vit_state_dict


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def v3_checkpoint(tmp_path_factory):
    # 4 blocks: eval_linear's default grid reads the last 4
    path = tmp_path_factory.mktemp("v3ckpt") / "tiny_v3.pth"
    torch.save(official_v3_vit_state_dict(dim=64, depth=4, heads=4, seed=5), path)
    return str(path)


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    return write_train_val(tmp_path_factory.mktemp("v3data"), num_classes=3, train_per_class=6, val_per_class=3)


def test_eval_knn_and_linear(v3_checkpoint, image_data, tmp_path):
    common = [
        "--data_path",
        str(image_data),
        "--num_workers",
        "0",
        "--device",
        "cpu",
        "--batch_size_per_gpu",
        "8",
        "--crop_size",
        "32",
        "--resize_size",
        "36",
        "--pretrained_weights",
        v3_checkpoint,
    ]
    knn = load_script("eval_knn").main(common + ["--nb_knn", "1", "--output_dir", str(tmp_path / "knn")])
    assert knn["num_val"] == 9 and knn["results"]["1"]["top1"] > 50  # solid-colour classes
    load_script("eval_linear").main(common + ["--epochs", "1", "--output_dir", str(tmp_path / "lin")])
    assert any((tmp_path / "lin").iterdir())


def test_visualisations(v3_checkpoint, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    load_script("visualize_attention").main(
        [
            "--pretrained_weights",
            v3_checkpoint,
            "--image_path",
            str(image),
            "--output_dir",
            str(tmp_path / "att"),
            "--image_size",
            "32",
            "--device",
            "cpu",
        ]
    )
    load_script("visualize_pca").main(
        [
            "--pretrained_weights",
            v3_checkpoint,
            "--image_paths",
            str(image),
            "--output_dir",
            str(tmp_path / "pca"),
            "--image_size",
            "32",
            "--device",
            "cpu",
        ]
    )
    assert list((tmp_path / "att").glob("*.png")) and list((tmp_path / "pca").glob("*.png"))
    from test_video_generation import write_frames

    write_frames(tmp_path / "frames", 3)
    count = load_script("video_generation").main(
        [
            "--input_path",
            str(tmp_path / "frames"),
            "--output_path",
            str(tmp_path / "vid"),
            "--pretrained_weights",
            v3_checkpoint,
            "--device",
            "cpu",
        ]
    )
    assert count == 3


def test_retrieval_copy_detection_and_davis(v3_checkpoint, tmp_path):
    import test_eval_copy_detection as copy_fixtures
    import test_eval_davis as davis_fixtures
    import test_eval_retrieval as retrieval_fixtures

    sys.path.insert(0, str(REPO_ROOT))
    import eval_copy_detection
    import eval_image_retrieval
    import eval_video_segmentation

    retrieval = eval_image_retrieval.main(
        [
            "--data_path",
            str(retrieval_fixtures.write_revisitop(tmp_path / "rv")),
            "--dataset",
            "roxford5k",
            "--imsize",
            "32",
            "--pretrained_weights",
            v3_checkpoint,
            "--device",
            "cpu",
            "--num_workers",
            "0",
            "--output_dir",
            str(tmp_path / "rvo"),
            "--ranking",
            "torch",
        ]
    )
    assert set(retrieval["results"]) == {"easy", "medium", "hard"}
    copies = eval_copy_detection.main(
        [
            "--data_path",
            str(copy_fixtures.write_copydays(tmp_path / "cd")),
            "--imsize",
            "32",
            "--pretrained_weights",
            v3_checkpoint,
            "--device",
            "cpu",
            "--num_workers",
            "0",
            "--output_dir",
            str(tmp_path / "cdo"),
        ]
    )
    assert "strong" in copies["results"]
    davis_root, _ = davis_fixtures.write_davis(tmp_path / "dv")
    eval_video_segmentation.main(
        [
            "--data_path",
            str(davis_root),
            "--pretrained_weights",
            v3_checkpoint,
            "--frame_size",
            "64",
            "--device",
            "cpu",
            "--output_dir",
            str(tmp_path / "dvo"),
            "--n_last_frames",
            "2",
            "--size_mask_neighborhood",
            "3",
        ]
    )
    assert "J&F-Mean" in json.loads((tmp_path / "dvo" / "davis_results.json").read_text())["results"]


def test_eval_linear_on_a_convnext_checkpoint(image_data, tmp_path):
    """A ConvNeXt has stages of different widths: the grid folds into the last stage's features, and runs."""
    from dino.hub import load_official

    path = tmp_path / "convnext_tiny.pth"
    torch.manual_seed(0)
    torch.save(load_official("dinov3_convnext_tiny", pretrained=False).state_dict(), path)
    common = ["--data_path", str(image_data), "--num_workers", "0", "--device", "cpu", "--batch_size_per_gpu", "8"]
    common += ["--crop_size", "32", "--resize_size", "36", "--pretrained_weights", str(path)]
    result = load_script("eval_linear").main(common + ["--epochs", "1", "--output_dir", str(tmp_path / "lin")])
    assert result["best"]["n_last_blocks"] == 1
