"""Linear depth probe: metrics on a known depth map (worked out independently here), the evaluation crops,
the NYU (.mat and PNG split) and KITTI readers on tiny datasets in their layouts, the losses, and the script
end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino.errors import UserError
from dino.eval import dense_data as data
from dino.eval import depth as depth_probe
from dino.eval.dense_metrics import DepthMetricAccumulator, depth_errors, eval_crop_mask, image_depth_metrics
from test_eval_knn import load_script
from test_features import save_tiny_vit

# ------------------------------------------------------------------------------------------- metrics


def test_metrics_of_a_known_depth_map():
    gt = np.array([[1.0, 2.0], [4.0, 0.0]])  # 0: no measurement
    pred = np.array([[1.0, 2.5], [2.0, 7.0]])
    m = image_depth_metrics(pred, gt, min_depth=1e-3, max_depth=10.0)
    # valid pixels: (1, 1), (2, 2.5), (4, 2); ratios max(g/p, p/g) = 1, 1.25, 2
    assert m["a1"] == pytest.approx(1 / 3)  # 1.25 is not < 1.25
    assert m["a2"] == pytest.approx(2 / 3) and m["a3"] == pytest.approx(2 / 3)
    assert m["abs_rel"] == pytest.approx((0 + 0.5 / 2 + 2 / 4) / 3)
    assert m["sq_rel"] == pytest.approx((0 + 0.25 / 2 + 4 / 4) / 3)
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 0.25 + 4) / 3))
    assert m["log10"] == pytest.approx((0 + abs(math.log10(2 / 2.5)) + abs(math.log10(4 / 2))) / 3)
    logs = [0.0, math.log(2.5 / 2), math.log(2 / 4)]
    assert m["rmse_log"] == pytest.approx(math.sqrt(sum(e * e for e in logs) / 3))
    mean = sum(logs) / 3
    assert m["silog"] == pytest.approx(100 * math.sqrt(sum(e * e for e in logs) / 3 - mean * mean))


def test_caps_clamp_and_crop():
    gt = np.full((4, 4), 5.0)
    gt[0, 0] = 20.0  # above the cap: not evaluated
    pred = np.full((4, 4), 50.0)  # clamped to the cap 10 before scoring
    m = image_depth_metrics(pred, gt, 1e-3, 10.0)
    assert m["rmse"] == pytest.approx(5.0) and m["abs_rel"] == pytest.approx(1.0)
    empty = image_depth_metrics(pred, np.zeros((4, 4)), 1e-3, 10.0)
    assert all(math.isnan(v) for v in empty.values())
    acc = DepthMetricAccumulator()
    acc.add(m)
    acc.add(empty)  # an image without ground truth is left out of the mean
    acc.add(depth_errors(np.array([2.0]), np.array([2.0])))
    summary = DepthMetricAccumulator.summary(acc.totals())
    assert summary["num_images"] == 2 and summary["rmse"] == pytest.approx(2.5)


def test_evaluation_crops():
    nyu = eval_crop_mask(480, 640, "nyu")
    assert nyu.sum() == (471 - 45) * (601 - 41) and nyu[45, 41] and not nyu[44, 41] and not nyu[45, 601]
    h, w = 375, 1242
    garg = eval_crop_mask(h, w, "garg")
    rows, cols = np.nonzero(garg)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (
        int(0.40810811 * h),
        int(0.99189189 * h),
        int(0.03594771 * w),
        int(0.96405229 * w),
    )
    eigen = eval_crop_mask(h, w, "eigen")
    rows, _ = np.nonzero(eigen)
    assert rows.min() == int(0.3324324 * h) and rows.max() + 1 == int(0.91351351 * h)
    assert eval_crop_mask(3, 3, "none").all()
    with pytest.raises(ValueError):
        eval_crop_mask(3, 3, "bogus")


# -------------------------------------------------------------------------------------------- losses


def test_losses():
    gt = torch.rand(2, 1, 8, 8) * 5 + 1
    scaled = gt * 2.0
    # scale-invariant: a constant factor leaves only the λ·mean² term, √0.15·ln 2 (ε is negligible here)
    assert depth_probe.sig_loss(scaled, gt).item() == pytest.approx(math.sqrt(0.15) * math.log(2.0), rel=1e-3)
    assert depth_probe.sig_loss(gt, gt).item() == pytest.approx(0.0, abs=1e-5)
    assert depth_probe.gradient_loss(scaled, gt).item() == pytest.approx(0.0, abs=1e-3)  # same log gradients (up to ε)
    bumpy = gt.clone()
    bumpy[..., 4, 4] *= 3
    assert depth_probe.gradient_loss(bumpy, gt).item() > 0


def test_classification_head_stays_in_range():
    head = depth_probe.LinearDepthHead(embed_dim=8, num_layers=2, min_depth=0.5, max_depth=10.0, n_bins=16)
    features = [(torch.randn(2, 8, 3, 4) * 10, torch.randn(2, 8)) for _ in range(2)]
    out = head(features)
    assert out.shape == (2, 1, 12, 16) and out.min() >= 0.5 and out.max() <= 10.0
    regression = depth_probe.LinearDepthHead(8, 1, 0.5, 10.0, classify=False, use_cls_token=False, upsample=1)
    assert regression(features[:1]).shape == (2, 1, 3, 4) and regression(features[:1]).min() >= 0.5


# ------------------------------------------------------------------------------- datasets on disk

SIZE = (48, 64)


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Depth grows with the row (floor-like); the image is a colour ramp of the depth, so it is predictable."""
    depth = np.linspace(1.0, 8.0, SIZE[0])[:, None].repeat(SIZE[1], axis=1) * rng.uniform(0.8, 1.2)
    shade = (depth / 10 * 255).astype(np.uint8)
    image = np.stack([shade, 255 - shade, np.full_like(shade, 128)], axis=-1)
    return image, depth


def write_nyu_png(root: Path, train: int = 4, test: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, count, list_name in (("train", train, "nyu_train.txt"), ("test", test, "nyu_test.txt")):
        lines = []
        for i in range(count):
            scene = root / ("sync" if split == "train" else "official_splits/test") / f"kitchen_{i:04d}"
            scene.mkdir(parents=True, exist_ok=True)
            image, depth = _scene(rng)
            Image.fromarray(image).save(scene / f"rgb_{i:05d}.jpg", quality=95)
            mm = (depth * 1000).astype(np.uint16)
            mm[0, :3] = 0
            Image.fromarray(mm).save(scene / f"sync_depth_{i:05d}.png")
            rel = scene.relative_to(root)
            lines.append(f"/{rel}/rgb_{i:05d}.jpg /{rel}/sync_depth_{i:05d}.png 518.8579")
        (root / list_name).write_text("\n".join(lines) + "\n")
    return root


def write_nyu_mat(root: Path, count: int = 5) -> Path:
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    scenes = [_scene(rng) for _ in range(count)]
    root.mkdir(parents=True, exist_ok=True)
    savemat(
        root / "nyu_depth_v2_labeled.mat",
        dict(
            images=np.stack([s[0] for s in scenes], axis=-1),
            depths=np.stack([s[1] for s in scenes], axis=-1).astype(np.float32),
        ),
    )
    savemat(root / "splits.mat", dict(trainNdxs=np.array([[1], [2], [3]]), testNdxs=np.array([[4], [5]])))
    return root


def write_kitti(root: Path, train: int = 3, test: int = 2) -> Path:
    rng = np.random.default_rng(2)
    for list_name, count in (("kitti_eigen_train.txt", train), ("kitti_eigen_test.txt", test)):
        lines = []
        for i in range(count):
            drive = f"2011_09_26/2011_09_26_drive_{i:04d}_sync"
            (root / "input" / drive / "image_02/data").mkdir(parents=True, exist_ok=True)
            (root / "gt_depth" / drive / "proj_depth/groundtruth/image_02").mkdir(parents=True, exist_ok=True)
            image, depth = _scene(rng)
            sparse = np.where(rng.random(SIZE) < 0.3, depth * 5, 0.0)  # LiDAR: sparse, metres × 256 on disk
            name = f"{list_name[12:17]}{i:010d}.png"
            Image.fromarray(image).save(root / "input" / drive / "image_02/data" / name)
            Image.fromarray((sparse * 256).astype(np.uint16)).save(
                root / "gt_depth" / drive / "proj_depth/groundtruth/image_02" / name
            )
            lines.append(f"{drive}/image_02/data/{name} {drive}/proj_depth/groundtruth/image_02/{name} 721.5377")
        lines.append("2011_09_26/missing.png None 721.5377")
        (root / list_name).write_text("\n".join(lines) + "\n")
    return root


def test_nyu_png_reader(tmp_path):
    root = write_nyu_png(tmp_path)
    files = data.depth_files("nyu", str(root), "val")
    val = data.DepthDataset(files)
    image, depth, box, index = val[0]
    assert len(val) == 2 and image.shape == (3, *SIZE) and depth.shape == SIZE and box.tolist() == [0, 0, *SIZE]
    assert depth[0, 0] == 0 and 0.8 <= depth[5, 5] <= 10
    train = data.DepthDataset(
        data.depth_files("nyu", str(root), "train"),
        data.DepthTrainAugmentation(
            crop_size=(32, 40), nyu_crop=False, rotate_degree=2.5, brightness_range=(0.75, 1.25), color_prob=0.5
        ),
    )
    crop, crop_depth = train[1]
    assert crop.shape == (3, 32, 40) and crop_depth.shape == (32, 40)


def test_nyu_mat_reader(tmp_path):
    root = write_nyu_mat(tmp_path)
    train = data.DepthDataset(data.depth_files("nyu", str(root), "train"))
    val = data.DepthDataset(data.depth_files("nyu", str(root), "val"))
    assert len(train) == 3 and len(val) == 2
    _, depth, _, _ = val[1]  # the 5th scene (1-based index 5 in splits.mat)
    rng = np.random.default_rng(1)
    expected = [_scene(rng) for _ in range(5)][4][1]
    assert np.allclose(depth.numpy(), expected, atol=1e-5)


def test_kitti_reader_skips_lines_without_depth(tmp_path):
    root = write_kitti(tmp_path)
    files = data.depth_files("kitti", str(root), "val")
    assert len(files.images) == 2 and files.kb_crop and files.depth_scale == 256
    _, depth, box, _ = data.DepthDataset(files)[0]
    assert box.tolist() == [0, 0, *SIZE] and depth.max() > 5  # metres, from the ×256 PNG
    assert data.kb_crop_box(375, 1242) == (23, 13, 375, 1229)


@pytest.mark.parametrize("dataset, message", [("nyu", "nyu_depth_v2_labeled.mat"), ("kitti", "kitti_eigen_train.txt")])
def test_wrong_layout_is_one_line(tmp_path, dataset, message):
    with pytest.raises(UserError, match=message) as info:
        data.depth_files(dataset, str(tmp_path), "train")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="not a folder"):
        data.depth_files(dataset, str(tmp_path / "absent"), "train")


# ------------------------------------------------------------------------------------------ end to end


def _argv(root, weights, out, dataset, *extra):
    return [
        "--dataset",
        dataset,
        "--data_path",
        str(root),
        "--pretrained_weights",
        str(weights),
        "--device",
        "cpu",
        "--iterations",
        "4",
        "--batch_size_per_device",
        "2",
        "--num_workers",
        "0",
        "--crop_size",
        "32",
        "40",
        "--num_pictures",
        "2",
        "--output_dir",
        str(out),
        "train.checkpoint_every=2",
        "head.n_bins=32",
        *extra,
    ]


def test_end_to_end_nyu_and_resume(tmp_path):
    root = write_nyu_png(tmp_path / "nyu")
    weights = save_tiny_vit(tmp_path / "vit.safetensors")
    script = load_script("eval_depth")
    out = tmp_path / "out"
    argv = _argv(root, weights, out, "nyu")
    result = script.main(argv)
    assert result["num_images"] == 2 and result["rmse"] > 0 and 0 <= result["a1"] <= 1
    saved = json.loads((out / depth_probe.RESULTS_NAME).read_text())
    assert saved["rmse"] == pytest.approx(result["rmse"])
    assert (out / depth_probe.PICTURE_NAME).is_file() and any((out / "tensorboard").iterdir())
    assert torch.load(out / depth_probe.CHECKPOINT_NAME, weights_only=True)["iteration"] == 4
    again = script.main(argv)  # resumes a finished head: same scores
    assert again["rmse"] == pytest.approx(result["rmse"])
    with pytest.raises(UserError, match="different probe"):
        script.main(argv + ["--loss", "regression"])


def test_end_to_end_kitti_regression(tmp_path):
    root = write_kitti(tmp_path / "kitti")
    weights = save_tiny_vit(tmp_path / "vit.safetensors")
    result = load_script("eval_depth").main(
        _argv(root, weights, tmp_path / "out", "kitti", "--loss", "regression", "--eval_crop", "eigen")
    )
    assert result["protocol"]["eval_crop"] == "eigen" and result["protocol"]["depth_range"] == [1e-3, 80.0]
    assert result["num_images"] == 2 and math.isfinite(result["rmse"])


def test_end_to_end_nyu_mat_lin4_needs_four_blocks(tmp_path):
    root = write_nyu_mat(tmp_path / "nyu")
    weights = save_tiny_vit(tmp_path / "vit.safetensors")  # 2 blocks
    with pytest.raises(UserError, match="only 2 blocks"):
        load_script("eval_depth").main(_argv(root, weights, tmp_path / "out", "nyu", "--config", "depth_lin4"))
    result = load_script("eval_depth").main(_argv(root, weights, tmp_path / "out1", "nyu", "--iterations", "2"))
    assert result["num_images"] == 2


def test_dino_subcommand_help(capsys):
    from dino.cli import dispatch

    with pytest.raises(SystemExit) as info:
        dispatch(["eval-depth", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "dino eval-depth" in text and "--eval_crop" in text and "NYU" in text
    with pytest.raises(UserError, match="not a folder"):
        dispatch(["eval-segmentation", "--data_path", "/nonexistent/ade", "--device", "cpu"])
