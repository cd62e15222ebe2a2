"""Copydays copy detection: positives by name prefix, GeM pooling, DINO v1's PCA-whitening, the top-k mAP,
layout errors, and an end-to-end run of eval_copy_detection.py on a tiny Copydays-style folder."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino.errors import UserError
from dino.eval import copy_detection as C
from tests.test_eval_retrieval import save_tiny_vit

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_strong_positives_share_the_first_four_characters():
    originals = ["200000.jpg", "200050.jpg", "201000.jpg", "201500.jpg", "215000.jpg"]
    strong = ["200001.jpg", "201003.jpg", "215002.jpg"]
    positives = C.strong_positives(originals, strong)
    # 201500 shares three characters with 201003, not four
    assert [p.tolist() for p in positives] == [[0, 1], [2], [4]]


def test_gem_pool_against_a_hand_computation():
    tokens = torch.tensor([[[1.0, -2.0], [3.0, 0.5]]])  # (B=1, N=2, D=2)
    expected_first = ((1.0**4 + 3.0**4) / 2) ** 0.25
    expected_second = ((1e-6**4 + 0.5**4) / 2) ** 0.25  # negatives clamp to 1e-6
    assert torch.allclose(C.gem_pool(tokens), torch.tensor([[expected_first, expected_second]]))


def test_copydays_feature_concatenates_cls_and_gem():
    class Tokens(torch.nn.Module):
        patch_size = 4

        def get_intermediate_layers(self, x, n=1, return_class_token=False, norm=True, reshape=False):
            b = x.shape[0]
            patches = torch.arange(1.0, 1.0 + 2 * 4).reshape(1, 4, 2).expand(b, 4, 2)
            cls = torch.full((b, 2), -7.0)
            return ((patches, cls),)

    feature = C.copydays_feature(Tokens(), torch.zeros(3, 3, 8, 8))
    assert feature.shape == (3, 4)
    assert torch.allclose(feature[:, :2], torch.full((3, 2), -7.0))
    odd, even = torch.tensor([1.0, 3, 5, 7]), torch.tensor([2.0, 4, 6, 8])
    assert torch.allclose(feature[0, 2:], torch.stack([odd.pow(4).mean().pow(0.25), even.pow(4).mean().pow(0.25)]))


def test_learned_whitening_whitens_the_second_moment():
    torch.manual_seed(0)
    mixing = torch.randn(6, 6)
    features = torch.randn(500, 6) @ mixing + 3.0
    whitening = C.learn_whitening(features)
    x = features.double()
    second_moment = x.T @ x / x.shape[0]  # DINO v1 whitens the uncentred second moment
    assert torch.allclose(
        whitening.projection @ second_moment @ whitening.projection.T, torch.eye(6, dtype=torch.float64), atol=1e-8
    )
    assert torch.allclose(whitening.mean, x.mean(0))
    applied = whitening.apply(features[:3])
    assert torch.allclose(applied, (x[:3] - x.mean(0)) @ whitening.projection.T)


def test_whitening_of_a_rank_deficient_set_stays_finite():
    features = torch.randn(3, 10)  # 3 samples in 10 dims: 7 zero eigenvalues, floored at max·1e-5
    whitening = C.learn_whitening(features)
    assert torch.isfinite(whitening.projection).all()
    eigenvalues = torch.linalg.eigvalsh(features.double().T @ features.double() / 3)
    scale = whitening.projection.norm(dim=1).max()
    assert scale == pytest.approx(float((eigenvalues.max() * 1e-5) ** -0.5), rel=1e-6)


def test_copy_detection_map_hand_worked():
    # query 0: positives {0, 1}, retrieved at positions 0 and 2 → 19/24; query 1: positive {2} at position 1 → ¼;
    # query 2: its positive 3 is not in the scored top 3 → 0
    ranking = np.array([[0, 5, 4], [4, 2, 5], [1, 0, 6]])
    mean_ap, aps = C.copy_detection_map(ranking, [np.array([0, 1]), np.array([2]), np.array([3])])
    assert aps.tolist() == pytest.approx([19 / 24, 0.25, 0.0])
    assert mean_ap == pytest.approx((19 / 24 + 0.25) / 3)


# ------------------------------------------------------------------------------------- dataset


def write_copydays(root: Path, size: int = 40) -> Path:
    rng = np.random.default_rng(1)
    (root / "original").mkdir(parents=True)
    (root / "strong").mkdir()
    for name in ("200000.jpg", "201000.jpg", "202000.jpg"):
        pixels = rng.integers(0, 256, size=(size, size + 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "original" / name, quality=95)
        # the strong "attack" is an exact copy, so it must be retrieved first
        shutil.copy(root / "original" / name, root / "strong" / name.replace("000.jpg", "003.jpg"))
    return root


def write_images(folder: Path, count: int, seed: int, size: int = 40) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(folder / f"img_{i}.jpg")
    return folder


def test_load_copydays_layout_errors(tmp_path):
    with pytest.raises(UserError, match="original"):
        C.load_copydays(str(tmp_path))
    write_copydays(tmp_path / "copydays")
    data = C.load_copydays(str(tmp_path / "copydays"))
    assert data.original_names == ["200000.jpg", "201000.jpg", "202000.jpg"]
    assert data.strong_names == ["200003.jpg", "201003.jpg", "202003.jpg"]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "copydays" / "strong" / "299000.jpg")
    with pytest.raises(UserError, match="299000.jpg"):
        C.load_copydays(str(tmp_path / "copydays"))
    shutil.rmtree(tmp_path / "copydays" / "strong")
    with pytest.raises(UserError, match="strong"):
        C.load_copydays(str(tmp_path / "copydays"))


# ------------------------------------------------------------------------------------ end to end


def _run_script(argv):
    sys.path.insert(0, str(REPO_ROOT))
    import eval_copy_detection

    return eval_copy_detection.main(argv)


def test_script_end_to_end_ranks_exact_copies_first(tmp_path):
    data = write_copydays(tmp_path / "copydays")
    weights = save_tiny_vit(tmp_path / "tiny.pth")
    distractors = write_images(tmp_path / "distractors", 2, seed=2)
    whitening = write_images(tmp_path / "whitening", 6, seed=3)
    output = tmp_path / "out"
    results = _run_script(
        [
            "--data_path",
            str(data),
            "--distractors_path",
            str(distractors),
            "--whitening_path",
            str(whitening),
            "--imsize",
            "32",
            "--pretrained_weights",
            str(weights),
            "--device",
            "cpu",
            "--num_workers",
            "0",
            "--batch_size_per_gpu",
            "4",
            "--output_dir",
            str(output),
            "--ranking",
            "torch",
        ]
    )
    written = json.loads((output / "copy_detection.json").read_text())
    assert written["results"]["strong"]["mAP"] == pytest.approx(100.0)
    assert written["top1_correct"] == 3
    assert written["protocol"]["distractors"] == 2 and "6 images" in written["protocol"]["whitening"]
    assert results["results"]["strong"]["mAP"] == pytest.approx(100.0)


def test_script_without_whitening_set_follows_dino_v1(tmp_path):
    data = write_copydays(tmp_path / "copydays")
    weights = save_tiny_vit(tmp_path / "tiny.pth")
    results = _run_script(
        [
            "--data_path",
            str(data),
            "--imsize",
            "32",
            "--pretrained_weights",
            str(weights),
            "--device",
            "cpu",
            "--num_workers",
            "0",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert results["protocol"]["whitening"].startswith("none")
    assert results["results"]["strong"]["mAP"] == pytest.approx(100.0)


def test_script_wrong_layout_names_the_folder(tmp_path):
    (tmp_path / "original").mkdir()
    with pytest.raises(UserError, match=str(tmp_path / "strong")):
        _run_script(["--data_path", str(tmp_path), "--device", "cpu"])
