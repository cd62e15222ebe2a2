"""Linear segmentation probe: mmseg-style metrics against hand-worked confusion matrices, the dataset readers on
tiny datasets written in the official layouts, sliding-window inference, and the script end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino.distributed import DeviceContext
from dino.errors import UserError
from dino.eval import dense_common as common
from dino.eval import dense_data as data
from dino.eval import segmentation as seg
from dino.eval.dense_metrics import intersect_and_union, remap_labels, segmentation_metrics
from test_eval_knn import load_script
from test_features import save_tiny_vit

CPU = DeviceContext(type="cpu")


# ------------------------------------------------------------------------------------------- metrics


def test_metrics_match_a_hand_worked_confusion_matrix():
    # 3 classes; truth row-wise, prediction column-wise; one ignored pixel predicted as class 0
    label = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 255]])
    pred = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 0]])
    areas = intersect_and_union(pred, label, num_classes=3)
    # confusion (truth → pred): 0→0 ×2, 0→1 ×1, 1→1 ×2, 1→2 ×1, 2→2 ×1
    assert areas.tolist() == [[2, 2, 1], [3, 4, 2], [2, 3, 2], [3, 3, 1]]
    metrics = segmentation_metrics(areas, ["a", "b", "c"])
    iou = [2 / 3, 2 / 4, 1 / 2]
    acc = [2 / 3, 2 / 3, 1 / 1]
    assert metrics["mIoU"] == pytest.approx(100 * sum(iou) / 3)
    assert metrics["mAcc"] == pytest.approx(100 * sum(acc) / 3)
    assert metrics["aAcc"] == pytest.approx(100 * 5 / 7)
    assert metrics["per_class"]["b"]["IoU"] == pytest.approx(50.0)


def test_absent_and_only_predicted_classes_follow_mmseg():
    # class 2 never occurs in the truth but is predicted: IoU 0 (counted), Acc NaN (left out);
    # class 3 neither occurs nor is predicted: NaN in both, left out of both means
    label = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    metrics = segmentation_metrics(intersect_and_union(pred, label, num_classes=4))
    per = metrics["per_class"]
    assert per["2"]["IoU"] == 0.0 and math.isnan(per["2"]["Acc"])
    assert math.isnan(per["3"]["IoU"]) and math.isnan(per["3"]["Acc"])
    assert metrics["mIoU"] == pytest.approx(100 * (1 / 2 + 1 + 0) / 3)
    assert metrics["mAcc"] == pytest.approx(100 * (1 / 2 + 1) / 2)


def test_areas_sum_over_images_not_per_image_means():
    a = intersect_and_union(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]), 2)
    b = intersect_and_union(torch.tensor([1]), torch.tensor([1]), 2)
    # class 1: intersection 1, union 2 over both images → 50 %, not the mean of 0 % and 100 %
    assert segmentation_metrics(a + b)["per_class"]["1"]["IoU"] == pytest.approx(50.0)


def test_reduce_zero_label_and_label_map():
    raw = torch.tensor([0, 1, 2, 150, 255])
    assert remap_labels(raw, reduce_zero_label=True).tolist() == [255, 0, 1, 149, 255]
    # prediction of class 0 against raw ADE label 1 is a hit; the raw 0 pixel is ignored
    areas = intersect_and_union(torch.tensor([0, 0, 5]), torch.tensor([1, 0, 0]), 150, reduce_zero_label=True)
    assert areas[0, 0] == 1 and areas[3].sum() == 1
    mapped = remap_labels(torch.tensor([7, 8, 26, 0, 33]), data._cityscapes_label_map())
    assert mapped.tolist() == [0, 1, 13, 255, 18]
    # all at once: a map 1→2, 2→3 does not chain
    assert remap_labels(torch.tensor([1, 2]), {1: 2, 2: 3}).tolist() == [2, 3]


def test_poly_schedule_with_warmup():
    assert common.poly_lr(1.0, 0, 100, warmup_iters=10, warmup_ratio=1e-6) == pytest.approx(1e-6)
    assert common.poly_lr(1.0, 5, 100, warmup_iters=10, warmup_ratio=0.0) == pytest.approx(0.95 * 0.5)
    assert common.poly_lr(1.0, 50, 100) == pytest.approx(0.5)
    assert common.poly_lr(1.0, 100, 100) == 0.0


def test_layer_selection():
    assert common.select_layers(12, 1) == [11]
    assert common.select_layers(12, 4, "last") == [8, 9, 10, 11]
    assert common.select_layers(12, 4, "even") == [2, 5, 8, 11]
    assert common.select_layers(40, 4, "even") == [9, 19, 29, 39]
    with pytest.raises(UserError, match="only 2 blocks"):
        common.select_layers(2, 4)


# ------------------------------------------------------------------------------- datasets on disk

SIZE = (40, 48)  # height, width of the synthetic images


def _scene(rng: np.random.Generator, num_classes: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each class a solid, separable colour; left half one class, a rectangle of another on the right."""
    colours = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]])[:num_classes]
    label = np.zeros(SIZE, dtype=np.uint8)
    a, b = rng.choice(num_classes, size=2, replace=False)
    label[:, : SIZE[1] // 2] = a
    label[:, SIZE[1] // 2 :] = b
    top, left = rng.integers(0, SIZE[0] // 2), rng.integers(SIZE[1] // 2, SIZE[1] - 8)
    label[top : top + 16, left : left + 8] = (b + 1) % num_classes
    image = colours[label] + rng.integers(-10, 10, size=(*SIZE, 3))
    return image.clip(0, 255).astype(np.uint8), label + offset


def write_ade20k(root: Path, train: int = 6, val: int = 3) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "ADEChallengeData2016"
    for split, count in (("training", train), ("validation", val)):
        (folder / "images" / split).mkdir(parents=True)
        (folder / "annotations" / split).mkdir(parents=True)
        for i in range(count):
            image, label = _scene(rng, 3, offset=1)  # ADE labels start at 1 (0 = other)
            label[0, :4] = 0
            name = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(image).save(folder / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(label).save(folder / "annotations" / split / f"{name}.png")
    return folder


def write_voc(root: Path, aug: bool = True) -> Path:
    rng = np.random.default_rng(1)
    folder = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (folder / sub).mkdir(parents=True)
    names = [f"2007_{i:06d}" for i in range(5)]
    pal = data.palette(256).reshape(-1).tolist()
    for name in names:
        image, label = _scene(rng, 3)
        label[-1, :] = 255  # boundary pixels
        Image.fromarray(image).save(folder / "JPEGImages" / f"{name}.jpg", quality=95)
        png = Image.fromarray(label, mode="L").convert("P")
        png.putpalette(pal)
        png.save(folder / "SegmentationClass" / f"{name}.png")
        Image.fromarray(label).save(folder / "SegmentationClassAug" / f"{name}.png")
    (folder / "ImageSets/Segmentation/train.txt").write_text("\n".join(names[:2]) + "\n")
    (folder / "ImageSets/Segmentation/val.txt").write_text("\n".join(names[3:]) + "\n")
    if aug:
        (folder / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(names[:3]) + "\n")
    return root / "VOCdevkit"


def write_cityscapes(root: Path, label_ids: bool) -> Path:
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for city in ("aachen", "bochum"):
            (root / "leftImg8bit" / split / city).mkdir(parents=True)
            (root / "gtFine" / split / city).mkdir(parents=True)
            stem = f"{city}_000000_000019"
            image, label = _scene(rng, 3)
            Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            if label_ids:
                ids = np.array([7, 8, 11], dtype=np.uint8)[label]
                ids[0, 0] = 1  # "ego vehicle": ignored
                Image.fromarray(ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
            else:
                Image.fromarray(label).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png")
    return root


def test_ade20k_reader(tmp_path):
    folder = write_ade20k(tmp_path)
    rows = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i + 1}\t0.1\t1\t1\tname{i};alias" for i in range(150)]
    (folder / "objectInfo150.txt").write_text("\n".join(rows) + "\n")
    files = data.segmentation_files("ade20k", str(tmp_path), "train")  # the parent of ADEChallengeData2016 works too
    assert len(files.images) == 6 and files.num_classes == 150 and files.reduce_zero_label
    assert files.class_names[0] == "name0" and files.class_names[149] == "name149"
    image, label, _ = data.SegmentationDataset(data.segmentation_files("ade20k", str(tmp_path), "val"))[0]
    assert image.shape == (3, *SIZE) and label.shape == SIZE
    assert set(label.unique().tolist()) <= {0, 1, 2, 255} and (label[0, :4] == 255).all()


def test_voc_reader_uses_the_augmented_list(tmp_path):
    root = write_voc(tmp_path)
    train = data.segmentation_files("voc2012", str(root), "train")
    assert len(train.images) == 3 and "SegmentationClassAug" in train.labels[0]
    val = data.SegmentationDataset(data.segmentation_files("voc2012", str(root), "val"))
    _, label, _ = val[0]
    assert (label[-1] == 255).all() and label.max() == 255 and set(label.unique().tolist()) <= {0, 1, 2, 255}


def test_cityscapes_reader_maps_label_ids(tmp_path):
    write_cityscapes(tmp_path / "ids", label_ids=True)
    write_cityscapes(tmp_path / "train_ids", label_ids=False)
    mapped = data.SegmentationDataset(data.segmentation_files("cityscapes", str(tmp_path / "ids"), "val"))
    direct = data.SegmentationDataset(data.segmentation_files("cityscapes", str(tmp_path / "train_ids"), "val"))
    assert len(mapped) == 2 and mapped.files.label_map is not None and direct.files.label_map is None
    _, label, _ = mapped[0]
    assert label[0, 0] == 255 and set(label.unique().tolist()) <= {0, 1, 2, 255}


@pytest.mark.parametrize(
    "dataset, make, message",
    [
        ("ade20k", lambda p: (p / "images").mkdir(), "annotations"),
        ("voc2012", lambda p: (p / "JPEGImages").mkdir(), "train.txt"),
        ("cityscapes", lambda p: (p / "leftImg8bit" / "train").mkdir(parents=True), "gtFine"),
    ],
)
def test_wrong_layout_is_one_line(tmp_path, dataset, make, message):
    make(tmp_path)
    with pytest.raises(UserError, match=message) as info:
        data.segmentation_files(dataset, str(tmp_path), "train")
    assert "\n" not in str(info.value) and "not a" in str(info.value)


def test_training_augmentation_crops_and_pads():
    rng = np.random.default_rng(0)
    image, label = _scene(rng, 3)
    aug = data.SegTrainAugmentation(
        crop_size=(64, 64), scale=(48, 40), ratio_range=(1.0, 1.0), cat_max_ratio=0.75, photometric=True
    )
    tensor, crop = aug(Image.fromarray(image), label.astype(np.int64), __import__("random").Random(0))
    assert tensor.shape == (3, 64, 64) and crop.shape == (64, 64)
    assert (crop[SIZE[0] :] == 255).all() and (tensor[:, SIZE[0] :] == 0).all()


# ------------------------------------------------------------------------------ inference and training


class ConstantHead(torch.nn.Module):
    num_classes = 2

    def forward(self, features):
        patch = features[0][0]
        return torch.stack([patch.mean(1), -patch.mean(1)], dim=1)


def test_slide_inference_covers_every_pixel_once_on_average(tmp_path):
    from test_features import tiny_vit

    model = tiny_vit()
    probe = seg.SegmentationProbe(model, ConstantHead(), [1], CPU)
    image = torch.randn(1, 3, 37, 50)
    slid = probe.slide_logits(image, crop=(37, 50), stride=(10, 10))
    assert torch.allclose(slid, probe.logits(image), atol=1e-5)  # one window = whole inference
    windows = probe.slide_logits(image, crop=(24, 24), stride=(16, 16))
    assert windows.shape == (1, 2, 37, 50) and torch.isfinite(windows).all()


def test_end_to_end_ade20k_and_resume(tmp_path, capsys):
    root = write_ade20k(tmp_path / "data")
    weights = save_tiny_vit(tmp_path / "vit.safetensors")
    script = load_script("eval_semantic_segmentation")
    out = tmp_path / "out"
    argv = [
        "--dataset",
        "ade20k",
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
        "32",
        "--test_crop_size",
        "32",
        "32",
        "--test_stride",
        "16",
        "16",
        "--num_pictures",
        "2",
        "--output_dir",
        str(out),
        "augmentation.scale=[48,40]",
        "test.scale=[48,40]",
        "train.warmup_iters=2",
        "train.checkpoint_every=2",
    ]
    result = script.main(argv)
    assert 0 <= result["mIoU"] <= 100 and len(result["per_class"]) == 150
    # strict JSON: classes absent from truth and prediction have IoU NaN in the result and null in the file
    saved = json.loads(
        (out / seg.RESULTS_NAME).read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the results file")
    )
    assert saved["mIoU"] == pytest.approx(result["mIoU"])
    assert math.isnan(result["per_class"]["149"]["Acc"]) and saved["per_class"]["149"]["Acc"] is None
    assert (out / seg.PICTURE_NAME).is_file() and (out / seg.CHECKPOINT_NAME).is_file()
    assert any((out / "tensorboard").iterdir())
    state = torch.load(out / seg.CHECKPOINT_NAME, weights_only=True)
    assert state["iteration"] == 4
    # a second run with the same folder resumes (nothing left to train) and scores the same head
    again = script.main(argv)
    assert again["mIoU"] == pytest.approx(result["mIoU"], nan_ok=True)
    # a different probe in the same folder is refused
    with pytest.raises(UserError, match="different probe"):
        script.main(argv + ["--iterations", "6"])


def test_head_learns_separable_colours_far_above_chance(tmp_path):
    """Random backbone, solid-colour regions: the linear head separates 3 classes well above chance."""
    root = write_voc(tmp_path / "voc")
    weights = save_tiny_vit(tmp_path / "vit.safetensors")
    result = load_script("eval_semantic_segmentation").main(
        [
            "--dataset",
            "voc2012",
            "--data_path",
            str(root),
            "--pretrained_weights",
            str(weights),
            "--device",
            "cpu",
            "--iterations",
            "60",
            "--batch_size_per_device",
            "3",
            "--num_workers",
            "0",
            "--crop_size",
            "40",
            "48",
            "--test_mode",
            "whole",
            "--num_pictures",
            "0",
            "--lr",
            "0.05",
            "--output_dir",
            str(tmp_path / "out"),
            "augmentation.scale=[48,40]",
            "augmentation.ratio_range=[1.0,1.0]",
            "augmentation.photometric=false",
            "test.scale=[48,40]",
            "train.warmup_iters=0",
        ]
    )
    # pixel accuracy of chance with 3 balanced-ish classes is about a third
    assert result["aAcc"] > 70, result


def test_cli_lists_the_commands_and_help_explains():
    from dino.cli import JOBS

    assert "eval-segmentation" in JOBS and "eval-depth" in JOBS
    text = seg.format_segmentation_table(segmentation_metrics(torch.tensor([[1.0], [1.0], [1.0], [1.0]]), ["sky"]))
    assert "sky" in text and "100.00" in text


def test_metrics_equal_an_independent_confusion_matrix_on_random_maps():
    rng = np.random.default_rng(3)
    num_classes, total = 5, torch.zeros(4, 5, dtype=torch.float64)
    confusion = np.zeros((num_classes, num_classes))
    for _ in range(4):
        label = rng.integers(0, num_classes, size=(9, 11))
        label[rng.random(label.shape) < 0.2] = 255
        pred = rng.integers(0, num_classes, size=label.shape)
        total += intersect_and_union(torch.from_numpy(pred), torch.from_numpy(label), num_classes)
        for t, p in zip(label.reshape(-1), pred.reshape(-1)):
            if t != 255:
                confusion[t, p] += 1
    tp = np.diag(confusion)
    iou = tp / (confusion.sum(0) + confusion.sum(1) - tp)
    metrics = segmentation_metrics(total)
    assert metrics["mIoU"] == pytest.approx(100 * iou.mean())
    assert metrics["mAcc"] == pytest.approx(100 * (tp / confusion.sum(1)).mean())
    assert metrics["aAcc"] == pytest.approx(100 * tp.sum() / confusion.sum())


def test_end_to_end_ms_protocol_on_four_blocks(tmp_path):
    from dino.hub import save_backbone
    from dino.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 8, img_size=32, embed_dim=16, depth=4, num_heads=2)
    weights = tmp_path / "vit4.safetensors"
    save_backbone(
        model,
        weights,
        model_kwargs=dict(arch="vit_tiny", patch_size=8, img_size=32, embed_dim=16, depth=4, num_heads=2),
    )
    root = write_ade20k(tmp_path / "data", train=2, val=2)
    result = load_script("eval_semantic_segmentation").main(
        [
            "--config",
            "segmentation_ms",
            "--dataset",
            "ade20k",
            "--data_path",
            str(root),
            "--pretrained_weights",
            str(weights),
            "--device",
            "cpu",
            "--iterations",
            "2",
            "--batch_size_per_device",
            "2",
            "--num_workers",
            "0",
            "--crop_size",
            "32",
            "32",
            "--test_crop_size",
            "24",
            "24",
            "--test_stride",
            "16",
            "16",
            # overrides right after a (height width) flag: the flag takes its two sizes and no more
            "augmentation.scale=[48,40]",
            "test.scale=[48,40]",
            "test.ratios=[0.5,1.0]",
            "train.warmup_iters=1",
            "--num_pictures",
            "1",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert result["protocol"]["head"] == "ms" and result["protocol"]["layers"] == [1, 2, 3, 4]
    assert "flip True" in result["protocol"]["test"] and 0 <= result["mIoU"] <= 100


_TWO_RANK_RUN = """
import sys
sys.path.insert(0, {repo!r})
from dino.jobs.eval_segmentation import main
main({argv!r})
"""


@pytest.mark.slow
def test_two_processes_score_like_one(tmp_path):
    """torchrun-style 2-rank run (gloo): DDP head training works, and the sharded evaluation sums to the
    single-process scores."""
    import os
    import socket
    import subprocess
    import sys

    from test_features import REPO_ROOT

    root = write_ade20k(tmp_path / "data", train=4, val=5)
    weights = save_tiny_vit(tmp_path / "vit.safetensors")

    def argv(out, iterations):
        return [
            "--dataset",
            "ade20k",
            "--data_path",
            str(root),
            "--pretrained_weights",
            str(weights),
            "--device",
            "cpu",
            "--iterations",
            str(iterations),
            "--batch_size_per_device",
            "1",
            "--num_workers",
            "0",
            "--crop_size",
            "32",
            "32",
            "--test_mode",
            "whole",
            "--num_pictures",
            "1",
            "--output_dir",
            str(out),
            "augmentation.scale=[48,40]",
            "test.scale=[48,40]",
        ]

    def launch(out, iterations) -> list[tuple[int, str]]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        procs = []
        for rank in range(2):
            env = dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
            )
            code = _TWO_RANK_RUN.format(repo=str(REPO_ROOT), argv=argv(out, iterations))
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True))
        errors = [proc.communicate(timeout=300)[1] for proc in procs]
        return [(proc.returncode, err) for proc, err in zip(procs, errors)]

    # Known, not understood yet: about one launch in fifteen a rank dies with SIGABRT and only "terminate called
    # without an active exception" (no Python frame) on this CPU build; that exact signature is relaunched once,
    # every other failure fails the test.
    def gloo_exit_abort(outcomes) -> bool:
        return any(code == -6 and "terminate called without an active exception" in err for code, err in outcomes)

    for out, iterations in ((tmp_path / "two_eval", 0), (tmp_path / "two_train", 2)):
        outcomes = launch(out, iterations)
        if gloo_exit_abort(outcomes):
            outcomes = launch(out, iterations)
        for code, err in outcomes:
            assert code == 0, err
    two = json.loads((tmp_path / "two_eval" / seg.RESULTS_NAME).read_text())
    one = load_script("eval_semantic_segmentation").main(argv(tmp_path / "one_eval", 0))
    assert two["mIoU"] == pytest.approx(one["mIoU"]) and two["aAcc"] == pytest.approx(one["aAcc"])
    trained = torch.load(tmp_path / "two_train" / seg.CHECKPOINT_NAME, weights_only=True)
    assert trained["iteration"] == 2


def test_demo_segmentation_set_masks_match_the_images(tmp_path):
    from dino.data.demo_dataset import DEMO_PATTERNS, make_demo_image

    root = data.ensure_demo_segmentation(str(tmp_path), train_per_class=2, val_per_class=1, image_size=48)
    assert data.ensure_demo_segmentation(str(tmp_path), train_per_class=2, val_per_class=1, image_size=48) == root
    files = data.segmentation_files("demo", root, "val")
    assert files.num_classes == 9 and files.class_names[0] == "background" and len(files.images) == 8
    # the val images are the classification demo's val images (same seeds)
    index = DEMO_PATTERNS.index("triangle")
    demo = np.asarray(make_demo_image("triangle", (0, 1, index, 0), 48), dtype=np.float64)
    assert np.array_equal(np.asarray(Image.open(files.images[index])), demo.astype(np.uint8))
    mask = np.asarray(Image.open(files.labels[index]))
    assert set(np.unique(mask)) == {0, index + 1}
    # the masked pixels carry the foreground colour: the two regions differ far more than they vary inside
    inside, outside = demo[mask > 0], demo[mask == 0]
    gap = np.linalg.norm(inside.mean(0) - outside.mean(0))
    assert gap > 3 * max(inside.std(0).max(), outside.std(0).max())
    texture = np.asarray(Image.open(files.labels[DEMO_PATTERNS.index("checkerboard")]))
    assert (texture == DEMO_PATTERNS.index("checkerboard") + 1).all()
    result = load_script("eval_semantic_segmentation").main(
        [
            "--dataset",
            "demo",
            "--data_path",
            root,
            "--pretrained_weights",
            str(save_tiny_vit(tmp_path / "vit.safetensors")),
            "--device",
            "cpu",
            "--iterations",
            "2",
            "--batch_size_per_device",
            "4",
            "--num_workers",
            "0",
            "--crop_size",
            "32",
            "32",
            "--test_mode",
            "whole",
            "--num_pictures",
            "0",
            "--output_dir",
            str(tmp_path / "out"),
            "augmentation.scale=[48,48]",
            "test.scale=[48,48]",
        ]
    )
    assert set(result["per_class"]) == {"background", *DEMO_PATTERNS}
