"""DAVIS-2017: J and F against hand-worked cases and a brute-force reference, the per-object statistics,
the semi-supervised rules (first/last frame dropped, void, object count, zero padding), label propagation on a
synthetic video whose features are known, and end-to-end runs of eval_video_segmentation.py."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino.errors import UserError
from dino.eval import davis as D
from dino.eval import label_propagation as L
from tests.test_eval_retrieval import save_tiny_vit

REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------- independent references


def reference_boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixel by pixel: differs from its east, south or south-east neighbour (outside = 0); last row:
    east only; last column: south only; the bottom-right pixel never."""
    height, width = mask.shape
    out = np.zeros_like(mask, dtype=bool)
    for i in range(height):
        for j in range(width):
            value = bool(mask[i, j])
            east = bool(mask[i, j + 1]) if j + 1 < width else False
            south = bool(mask[i + 1, j]) if i + 1 < height else False
            south_east = bool(mask[i + 1, j + 1]) if i + 1 < height and j + 1 < width else False
            if i == height - 1 and j == width - 1:
                out[i, j] = False
            elif j == width - 1:
                out[i, j] = value != south
            elif i == height - 1:
                out[i, j] = value != east
            else:
                out[i, j] = value != east or value != south or value != south_east
    return out


def reference_f(segmentation: np.ndarray, annotation: np.ndarray, radius: float) -> float:
    """F from Euclidean distances between boundary pixels: a boundary pixel matches when the other boundary
    has a pixel within `radius`."""
    seg_points = np.argwhere(reference_boundary(segmentation))
    gt_points = np.argwhere(reference_boundary(annotation))
    if len(seg_points) == 0 and len(gt_points) == 0:
        return 1.0
    if len(seg_points) == 0 or len(gt_points) == 0:
        return 0.0
    distances = np.sqrt(((seg_points[:, None, :] - gt_points[None, :, :]) ** 2).sum(-1))
    precision = float(np.mean(distances.min(axis=1) <= radius))
    recall = float(np.mean(distances.min(axis=0) <= radius))
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def square(shape, top, left, size) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


# --------------------------------------------------------------------------------------------- J


def test_iou_hand_worked_with_void():
    annotation = square((4, 4), 0, 0, 2)  # rows 0-1, cols 0-1
    segmentation = np.zeros((4, 4), bool)
    segmentation[0:2, 1:3] = True  # rows 0-1, cols 1-2
    assert D.db_eval_iou(annotation, segmentation) == pytest.approx(2 / 6)
    void = np.zeros((4, 4), bool)
    void[:, 2] = True  # the two pixels only the segmentation has in column 2
    assert D.db_eval_iou(annotation, segmentation, void) == pytest.approx(2 / 4)


def test_iou_empty_union_is_one_and_disjoint_is_zero():
    empty = np.zeros((5, 5), bool)
    assert D.db_eval_iou(empty, empty) == 1.0
    inside_void = square((5, 5), 0, 0, 2)
    assert D.db_eval_iou(inside_void, empty, void_pixels=inside_void) == 1.0
    assert D.db_eval_iou(square((5, 5), 0, 0, 2), square((5, 5), 3, 3, 2)) == 0.0
    stacked = D.db_eval_iou(np.stack([empty, square((5, 5), 0, 0, 2)]), np.stack([empty, square((5, 5), 0, 0, 2)]))
    assert stacked.tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------------------------- F


def test_seg2bmap_hand_worked():
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = True
    expected = np.zeros((4, 4), bool)
    expected[0, 0] = expected[0, 1] = expected[1, 0] = expected[1, 1] = True
    assert np.array_equal(D.seg2bmap(mask), expected)


def test_seg2bmap_matches_pixelwise_reference():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((9, 11)) > 0.6
        assert np.array_equal(D.seg2bmap(mask), reference_boundary(mask))


def test_disk_and_tolerance():
    assert D.disk(1).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert D.disk(2).sum() == 13
    assert D.boundary_tolerance((480, 854)) == math.ceil(0.008 * math.hypot(480, 854)) == 8
    assert D.boundary_tolerance((64, 64)) == 1
    assert D.boundary_tolerance((64, 64), bound_th=3) == 3


def test_boundary_matches_equal_a_disk_dilation():
    rng = np.random.default_rng(2)
    for radius in (1, 2, 5):
        boundary = rng.random((30, 41)) > 0.9
        other = rng.random((30, 41)) > 0.95
        expected = boundary & D.dilate_disk(other, radius)
        assert np.array_equal(D.boundary_matches(boundary, other, radius), expected)
    # dilating a single pixel by disk(2) gives the 13-pixel disk, clipped at the image border
    point = np.zeros((7, 7), bool)
    point[0, 3] = True
    assert D.dilate_disk(point, 2).sum() == 13 - 4


def test_f_simple_shapes():
    shape = (64, 64)
    a = square(shape, 20, 20, 16)
    empty = np.zeros(shape, bool)
    assert D.db_eval_boundary(a, a) == 1.0
    assert D.db_eval_boundary(empty, empty) == 1.0
    assert D.db_eval_boundary(a, empty) == 0.0
    assert D.db_eval_boundary(empty, a) == 0.0
    # shifted by one pixel, within the ceil(0.008 · 90.5) = 1 px tolerance: every boundary pixel matches
    assert D.db_eval_boundary(a, square(shape, 20, 21, 16)) == 1.0
    assert D.db_eval_boundary(a, square(shape, 21, 21, 16)) == pytest.approx(
        reference_f(square(shape, 21, 21, 16), a, 1)
    )
    far = D.db_eval_boundary(a, square(shape, 20, 30, 16))
    assert far < 0.5
    assert far == pytest.approx(reference_f(square(shape, 20, 30, 16), a, 1))
    # a larger pixel tolerance recovers the far shift partly
    assert D.db_eval_boundary(a, square(shape, 20, 30, 16), bound_th=5) > far


def test_f_matches_brute_force_on_random_masks():
    rng = np.random.default_rng(1)
    for _ in range(4):
        annotation = ndimage_blob(rng, (40, 48))
        segmentation = ndimage_blob(rng, (40, 48))
        radius = D.boundary_tolerance((40, 48))
        assert D.db_eval_boundary(annotation, segmentation) == pytest.approx(
            reference_f(segmentation, annotation, radius)
        )
        assert D.db_eval_boundary(annotation, segmentation, bound_th=3) == pytest.approx(
            reference_f(segmentation, annotation, 3)
        )


def ndimage_blob(rng, shape) -> np.ndarray:
    """A random smooth-ish blob: thresholded low-resolution noise, upsampled."""
    low = rng.random((shape[0] // 8, shape[1] // 8))
    return np.kron(low, np.ones((8, 8))) > 0.5


# ------------------------------------------------------------------------------------- statistics


def test_db_statistics_hand_worked():
    values = np.array([1.0, 1.0, 0.7, 0.8, 0.6, 0.4, 0.2, np.nan])
    mean, recall, decay = D.db_statistics(values)
    assert mean == pytest.approx(4.7 / 7)  # nan ignored
    assert recall == pytest.approx(5 / 8)  # nan counts as a failure
    # 8 frames: bin edges round(linspace(1, 8, 5)) − 1 = 0, 2, 4, 5, 7 → first bin frames 0-2, last bin 5-7
    assert decay == pytest.approx((1.0 + 1.0 + 0.7) / 3 - (0.4 + 0.2) / 2)
    mean, recall, decay = D.db_statistics(np.array([0.9, 0.5, 0.3, 0.1]))
    # 4 frames: edges 0, 1, 2, 2, 3 → first bin frames 0-1, last bin frames 2-3; 0.5 is not > 0.5
    assert (mean, recall, decay) == pytest.approx((0.45, 0.25, 0.7 - 0.2))


def test_evaluate_sequence_semi_supervised_rules():
    gt = np.zeros((4, 6, 6), np.uint8)
    gt[0, 1:3, 1:3] = 1
    gt[0, 4:6, 4:6] = 2
    gt[1, 1:3, 1:3] = 1
    gt[1, 5, 0:4] = 255  # void: background for the semi-supervised evaluation
    gt[2, 1:3, 2:4] = 1
    gt[2, 4:6, 4:6] = 2
    predicted = np.zeros_like(gt)
    predicted[1, 1:3, 1:3] = 1
    predicted[1, 5, 0:4] = 1  # covers the void pixels: counted against J
    predicted[2, 1:3, 2:4] = 1  # object 2 missing: an empty mask
    predicted[3] = 3  # the last frame is not scored
    j, f = D.evaluate_sequence(gt, predicted, "seq")
    assert j.shape == f.shape == (2, 2)
    np.testing.assert_allclose(j, [[4 / 8, 1.0], [1.0, 0.0]])
    expected_f = reference_f(predicted[1] == 1, np.where(gt[1] == 255, 0, gt[1]) == 1, 1)
    np.testing.assert_allclose(f, [[expected_f, 1.0], [1.0, 0.0]])
    predicted[2, 0, 0] = 3
    with pytest.raises(UserError, match="object id 3"):
        D.evaluate_sequence(gt, predicted, "seq")


def test_label_png_roundtrip_keeps_ids_and_palette(tmp_path):
    palette = D.default_palette()
    assert palette[3:6] == [128, 0, 0] and palette[6:9] == [0, 128, 0] and palette[9:12] == [128, 128, 0]
    palette[3:6] = [10, 200, 30]
    labels = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    D.write_label_png(str(tmp_path / "x.png"), labels, palette)
    read, read_palette = D.read_label_png(str(tmp_path / "x.png"))
    assert np.array_equal(read, labels)
    assert read_palette[:12] == palette[:12]


# ------------------------------------------------------------------------------------- propagation


class ColourRegionModel(torch.nn.Module):
    """A 'backbone' whose patch feature is the one-hot of the patch's dominant colour channel (R, G or B)."""

    patch_size = 8

    def get_intermediate_layers(self, x, n=1, reshape=False, norm=True, return_class_token=False):
        means = F.avg_pool2d(x, self.patch_size)  # (B, 3, h, w)
        one_hot = F.one_hot(means.argmax(dim=1), 3).float()  # (B, h, w, 3)
        return (one_hot.reshape(x.shape[0], -1, 3),)


def band_video(num_frames: int = 5, size: int = 64) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Frames with a red band (object 1) moving right by one patch per frame and a static green band
    (object 2) on blue background; returns (RGB frames, label maps)."""
    frames, labels = [], []
    for t in range(num_frames):
        label = np.zeros((size, size), np.uint8)
        label[:, 8 * t : 8 * t + 16] = 1
        label[:, 48:64] = 2
        colours = np.array([[0, 0, 255], [255, 0, 0], [0, 255, 0]], np.uint8)
        frames.append(colours[label])
        labels.append(label)
    return frames, labels


def test_neighbourhood_mask_matches_window_loops():
    h, w, radius = 4, 5, 1
    mask = L.neighbourhood_mask(h, w, radius)
    for source in range(h * w):
        for target in range(h * w):
            inside = abs(source // w - target // w) <= radius and abs(source % w - target % w) <= radius
            assert bool(mask[source, target]) == inside


def test_propagate_labels_matches_brute_force():
    torch.manual_seed(0)
    h, w, num_context, channels, k, radius = 3, 4, 2, 3, 4, 1
    n = h * w
    target = F.normalize(torch.randn(n, 6), dim=1)
    contexts = [F.normalize(torch.randn(n, 6), dim=1) for _ in range(num_context)]
    labels = [torch.rand(channels, h, w) for _ in range(num_context)]
    result = L.propagate_labels(target, contexts, labels, h, w, topk=k, size_mask_neighborhood=radius)
    for q in range(n):
        weights, values = [], []
        for m in range(num_context):
            for s in range(n):
                inside = abs(s // w - q // w) <= radius and abs(s % w - q % w) <= radius
                weights.append(math.exp(float(target[q] @ contexts[m][s]) / 0.1) if inside else 0.0)
                values.append(labels[m].reshape(channels, -1)[:, s])
        kth = sorted(weights, reverse=True)[k - 1]
        kept = [wgt if wgt >= kth else 0.0 for wgt in weights]
        expected = sum(wgt * v for wgt, v in zip(kept, values)) / sum(kept)
        assert torch.allclose(result.reshape(channels, -1)[:, q], expected, atol=1e-5)


def _segment_band_video(tmp_path, radius):
    frames, labels = band_video()
    paths = []
    for t, frame in enumerate(frames):
        paths.append(str(tmp_path / f"{t:05d}.png"))
        Image.fromarray(frame).save(paths[-1])
    masks = L.segment_video(
        ColourRegionModel(),
        paths,
        labels[0],
        torch.device("cpu"),
        n_last_frames=2,
        size_mask_neighborhood=radius,
        topk=5,
        frame_size=64,
        progress=False,
    )
    return masks, labels


@pytest.mark.parametrize("radius", [12, 2, 0])
def test_segment_video_reproduces_known_regions(tmp_path, radius):
    masks, labels = _segment_band_video(tmp_path, radius)
    assert len(masks) == len(labels)
    for t in range(len(labels)):
        assert np.array_equal(masks[t], labels[t]), f"frame {t}"


def test_neighbourhood_window_limits_where_labels_come_from(tmp_path):
    # with a 1-patch window, the column object 1 uncovers in frame 1 sees only object-1 patches of frame 0
    # (columns 0-1), so it keeps label 1: the restriction is applied
    masks, labels = _segment_band_video(tmp_path, 1)
    assert (labels[1][:, 0:8] == 0).all() and (masks[1][:, 0:8] == 1).all()
    assert np.array_equal(masks[1][:, 8:], labels[1][:, 8:])


def test_frame_size_rule():
    assert L.frame_size_for(480, 854) == (480, 832)  # DINO v1: longer side rounded down to a multiple of 64
    assert L.frame_size_for(854, 480) == (832, 480)
    assert L.frame_size_for(48, 64, short_side=64) == (64, 64)
    with pytest.raises(UserError):
        L.frame_size_for(48, 64, short_side=32)


# ------------------------------------------------------------------------------------ end to end


def write_davis(root: Path, num_frames: int = 4, size: int = 64) -> tuple[Path, list[int]]:
    """A one-sequence DAVIS-2017 folder (JPEG frames, palette annotations with a custom colour, val.txt)."""
    frames, labels = band_video(num_frames, size)
    palette = D.default_palette()
    palette[3:6] = [10, 200, 30]
    for t, (frame, label) in enumerate(zip(frames, labels)):
        frame_dir = root / "JPEGImages" / "480p" / "bands"
        frame_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(frame_dir / f"{t:05d}.jpg", quality=95)
        D.write_label_png(str(root / "Annotations" / "480p" / "bands" / f"{t:05d}.png"), label, palette)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("bands\n")
    return root, palette


def _run_script(argv):
    sys.path.insert(0, str(REPO_ROOT))
    import eval_video_segmentation

    return eval_video_segmentation.main(argv)


def test_script_end_to_end(tmp_path):
    data, palette = write_davis(tmp_path / "davis")
    weights = save_tiny_vit(tmp_path / "tiny.pth")
    output = tmp_path / "out"
    results = _run_script(
        [
            "--data_path",
            str(data),
            "--pretrained_weights",
            str(weights),
            "--frame_size",
            "64",
            "--device",
            "cpu",
            "--output_dir",
            str(output),
            "--n_last_frames",
            "2",
            "--size_mask_neighborhood",
            "3",
        ]
    )
    written = json.loads((output / "davis_results.json").read_text())
    assert set(written["results"]) == set(D.GLOBAL_MEASURES)
    assert set(written["per_object"]) == {"bands_1", "bands_2"}
    assert written["results"]["J&F-Mean"] == pytest.approx(
        (written["results"]["J-Mean"] + written["results"]["F-Mean"]) / 2
    )
    assert (output / "global_results-val.csv").is_file() and (output / "per-sequence_results-val.csv").is_file()
    for t in range(4):
        predicted, predicted_palette = D.read_label_png(str(output / "bands" / f"{t:05d}.png"))
        assert predicted.shape == (64, 64)
        assert set(np.unique(predicted)) <= {0, 1, 2}
        assert predicted_palette[:12] == palette[:12]
    first, _ = D.read_label_png(str(output / "bands" / "00000.png"))
    assert np.array_equal(first, D.read_label_png(str(data / "Annotations" / "480p" / "bands" / "00000.png"))[0])
    assert results["protocol"]["objects"] == 2


def test_eval_only_scores_ground_truth_as_perfect(tmp_path):
    data, _ = write_davis(tmp_path / "davis", num_frames=6)
    predictions = tmp_path / "predictions"
    shutil.copytree(data / "Annotations" / "480p", predictions)
    results = _run_script(["--data_path", str(data), "--eval_only", "--output_dir", str(predictions)])
    expected = {
        "J&F-Mean": 1.0,
        "J-Mean": 1.0,
        "J-Recall": 1.0,
        "J-Decay": 0.0,
        "F-Mean": 1.0,
        "F-Recall": 1.0,
        "F-Decay": 0.0,
    }
    assert results["results"] == pytest.approx(expected)
    # a missing prediction of a scored frame is named
    (predictions / "bands" / "00002.png").unlink()
    with pytest.raises(UserError, match="00002.png"):
        _run_script(["--data_path", str(data), "--eval_only", "--output_dir", str(predictions)])


def test_script_wrong_layout_names_the_expected_path(tmp_path):
    with pytest.raises(UserError, match=r"ImageSets/2017/val\.txt"):
        _run_script(["--data_path", str(tmp_path), "--device", "cpu", "--output_dir", str(tmp_path / "o")])
    data, _ = write_davis(tmp_path / "davis")
    shutil.rmtree(data / "JPEGImages" / "480p" / "bands")
    with pytest.raises(UserError, match=r"JPEGImages/480p/bands"):
        _run_script(["--data_path", str(data), "--device", "cpu", "--output_dir", str(tmp_path / "o")])
