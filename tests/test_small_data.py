"""The small-data recipe: choices derived from the data, and the kNN evidence next to raw pixels and random init."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dino.config import compose, find_config
from dino.data.package_datasets import export_image_folder, stratified_split
from dino.train.knn_check import KnnMonitor, KnnProbe, baseline_verdict, format_baseline_table, raw_pixel_features
from dino.train.recipe import (
    DataStats,
    apply_small_data_recipe,
    choose_patch_size,
    derive_small_data_choices,
    explicit_keys_from_argv,
    inspect_images,
    suggest_preset,
)

# ------------------------------------------------------------------------------------------ derivation


@pytest.mark.parametrize("side, patch", [(8, 1), (16, 2), (28, 4), (32, 4), (33, 8), (64, 8), (96, 16), (128, 16)])
def test_patch_size_keeps_the_grid_at_most_eight_tokens(side, patch):
    assert choose_patch_size(side) == patch
    assert side / patch <= 8 and (patch == 1 or side / (patch // 2) > 8)


def test_mnist_sized_grayscale_data():
    choices = derive_small_data_choices(DataStats(num_images=4000, image_side=28, grayscale=True)).as_overrides()
    assert choices["model.patch_size"] == 4
    assert choices["crops.global_crops_size"] == 28 and choices["crops.local_crops_size"] == 12
    assert choices["crops.solarization_prob"] == 0.0 and choices["crops.blur_probs"] == [0.0, 0.0, 0.0]
    assert choices["optim.epochs"] == 30 and choices["optim.warmup_epochs"] == 3


def test_colour_data_of_128_px_keeps_solarisation_and_blur():
    choices = derive_small_data_choices(DataStats(num_images=20_000, image_side=128, grayscale=False)).as_overrides()
    assert choices["model.patch_size"] == 16 and choices["crops.global_crops_size"] == 128
    assert choices["crops.local_crops_size"] == 48  # 128·3/7 = 54.9 → a multiple of 16
    assert choices["crops.solarization_prob"] == 0.2
    assert "crops.blur_probs" not in choices  # the preset's value stays at ≥ 96 px
    assert choices["optim.epochs"] == 10 and choices["optim.warmup_epochs"] == 1  # 120k/20k = 6 → min 10


def test_epochs_follow_the_dataset_size_within_bounds():
    epochs = {
        n: derive_small_data_choices(
            DataStats(n, 32, False), images_seen=100_000, min_epochs=5, max_epochs=50
        ).as_overrides()["optim.epochs"]
        for n in (500, 4000, 50_000)
    }
    assert epochs == {500: 50, 4000: 25, 50_000: 5}


def test_crop_sizes_are_multiples_of_the_patch():
    for side in (20, 28, 30, 45, 64, 77, 100, 128):
        c = derive_small_data_choices(DataStats(1000, side, True)).as_overrides()
        p = c["model.patch_size"]
        assert c["crops.global_crops_size"] % p == 0 and c["crops.local_crops_size"] % p == 0
        assert c["crops.local_crops_size"] >= 2 * p and c["crops.local_crops_size"] < c["crops.global_crops_size"]


def _write_pngs(folder, n, size, colour):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 255, (size, size), dtype=np.uint8)
        image = (
            Image.fromarray(pixels, "L")
            if not colour
            else Image.fromarray(np.stack([pixels, pixels[::-1], pixels.T], axis=-1), "RGB")
        )
        image.save(folder / f"{i}.png")


def test_inspect_images_finds_count_side_and_grayscale(tmp_path):
    _write_pngs(tmp_path / "gray" / "a", 5, 20, colour=False)
    _write_pngs(tmp_path / "gray" / "b", 4, 20, colour=False)
    _write_pngs(tmp_path / "colour", 6, 40, colour=True)
    gray, colour = inspect_images(str(tmp_path / "gray")), inspect_images(str(tmp_path / "colour"))
    assert (gray.num_images, gray.image_side, gray.grayscale) == (9, 20, True)
    assert (colour.num_images, colour.image_side, colour.grayscale) == (6, 40, False)


def test_apply_recipe_fills_the_config_but_keeps_explicit_keys(caplog):
    assert find_config("train/small_data") is not None
    cfg = compose("train/small_data", ["optim.epochs=3"])
    stats = DataStats(num_images=1000, image_side=64, grayscale=False)
    with caplog.at_level("INFO", logger="dino"):
        apply_small_data_recipe(cfg, stats=stats, explicit={"optim.epochs"})
    printed = caplog.text
    assert cfg.model.patch_size == 8 and cfg.crops.global_crops_size == 64 and cfg.crops.local_crops_size == 24
    assert cfg.crops.solarization_prob == 0.2
    assert cfg.optim.epochs == 3  # set by the user: kept
    assert "small-data recipe for 1000 images, typical side 64 px, colour" in printed
    assert "kept the value you set" in printed and "model.patch_size" in printed


def test_recipe_is_off_without_recipe_auto():
    cfg = compose("train/demo")
    assert apply_small_data_recipe(cfg, stats=DataStats(10, 28, True)) is None
    assert cfg.model.patch_size == 8


def test_explicit_keys_from_a_command_line():
    keys = explicit_keys_from_argv(
        ["--epochs", "5", "--data_path", "x", "crops.local_crops_size=16"],
        {"--epochs": "optim.epochs", "--data_path": "train.data_path"},
    )
    assert keys == {"optim.epochs", "train.data_path", "crops.local_crops_size"}


def test_preset_hint_for_small_images():
    assert "small_data" in suggest_preset(DataStats(4000, 28, True), "demo")
    assert suggest_preset(DataStats(4000, 28, True), "small_data") is None
    assert suggest_preset(DataStats(1_000_000, 224, False), "dinov2_vits14") is None


# ------------------------------------------------------------------------------------------ baselines


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def test_raw_pixel_features_are_the_flattened_images():
    images = torch.randn(5, 3, 4, 4)
    feats, labels = raw_pixel_features(_Pairs(images, [0, 1, 0, 1, 2]), batch_size=2)
    assert torch.equal(feats, images.flatten(1)) and labels.tolist() == [0, 1, 0, 1, 2]


def _class_folders(root, per_class, size, seed):
    """Two classes a raw-pixel kNN separates perfectly: bright left half vs bright right half, plus noise."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("left", "right")):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 40, (size, size)).astype(np.uint8)
            if label == 0:
                pixels[:, : size // 2] += 200
            else:
                pixels[:, size // 2 :] += 200
            Image.fromarray(pixels, "L").save(folder / f"{i}.png")


def test_raw_pixels_baseline_and_monitor(tmp_path, caplog):
    caplog.set_level("INFO", logger="dino")
    _class_folders(tmp_path / "data" / "train", 6, 16, seed=0)
    _class_folders(tmp_path / "data" / "val", 3, 16, seed=1)
    probe = KnnProbe.from_folders(
        str(tmp_path / "data" / "train"),
        str(tmp_path / "data" / "val"),
        16,
        k=3,
        temperature=0.07,
        batch_size=64,
        num_workers=0,
    )
    assert probe.raw_pixels_top1() == pytest.approx(100.0)

    cfg = compose(
        "train/small_data",
        [
            f"train.data_path={tmp_path / 'data' / 'train'}",
            "train.device=cpu",
            "train.num_workers=0",
            "train.knn_k=3",
            "model.depth=1",
            "model.embed_dim=48",
            "model.patch_size=8",
            "crops.global_crops_size=16",
            "crops.local_crops_size=8",
        ],
    )
    logged = []
    monitor = KnnMonitor(cfg, every=2, log=logged.append)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
    assert monitor.maybe_run(backbone, epoch=1) is None  # not a multiple of 2
    row = monitor.maybe_run(backbone, epoch=2)
    assert row["knn_raw_pixels"] == pytest.approx(100.0)
    assert 0.0 <= row["knn_random_init"] <= 100.0 and 0.0 <= row["knn_teacher"] <= 100.0
    assert logged == [row] and monitor.history == [row]
    assert "raw pixels 100.00 %" in caplog.text
    assert backbone.training  # put back in train mode


def test_monitor_is_off_without_a_val_split(tmp_path):
    _class_folders(tmp_path / "flat", 2, 8, seed=0)
    cfg = compose("train/small_data", [f"train.data_path={tmp_path / 'flat'}"])
    assert not KnnMonitor(cfg, every=1).active
    assert not KnnMonitor(cfg).active  # knn_every_epochs: 0


def test_report_table_and_verdict():
    rows = {"trained teacher": 90.0, "raw pixels": 80.0, "random init": 50.0}
    table = format_baseline_table(20, 0.07, "val/", rows, num_classes=10)
    assert "raw pixels" in table and "+10.00 points" in table and "+40.00 points" in table
    assert "chance: 10.0 %" in table
    assert baseline_verdict(90.0, 80.0, 50.0).startswith("features worth having")
    assert baseline_verdict(82.0, 80.0, 50.0).startswith("better than raw pixels, but")
    # the verdict names the margin that is missing (here only the one over random init)
    verdict = baseline_verdict(37.5, 17.5, 19.4)
    assert "1.9 points short of +20 over random init" in verdict and "raw pixels (" not in verdict
    assert baseline_verdict(70.0, 80.0, 50.0).startswith("NOT better than raw pixels")


# ------------------------------------------------------------------------------------------ data


def test_stratified_split_is_per_class_and_seeded():
    labels = np.repeat(np.arange(4), 10)
    train, val = stratified_split(labels, 0.2, seed=3)
    assert len(val) == 8 and np.bincount(labels[val]).tolist() == [2, 2, 2, 2]
    assert not set(train) & set(val) and len(train) + len(val) == 40
    assert np.array_equal(val, stratified_split(labels, 0.2, seed=3)[1])


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn (test extra) not installed")
def test_export_digits_as_image_folders(tmp_path):
    train = export_image_folder("digits", tmp_path / "digits", max_train=100)
    meta = json.loads((tmp_path / "digits" / "export.json").read_text())
    assert meta["train"] == 100 and meta["val"] == 359 and meta["image_size"] == [32, 32]
    assert len(list((tmp_path / "digits" / "val").rglob("*.png"))) == 359
    assert sorted(p.name for p in (tmp_path / "digits" / "train").iterdir()) == [f"{d:02d}" for d in range(10)]
    assert export_image_folder("digits", tmp_path / "digits", max_train=100) == train  # reused


# ------------------------------------------------------------------------------------------ main_dino.py hooks


def test_a_folder_of_small_images_defaults_to_the_small_data_preset(tmp_path, caplog):
    caplog.set_level("INFO", logger="dino")
    from dino.train.recipe import default_preset_for_data

    _write_pngs(tmp_path / "small" / "a", 3, 28, colour=False)
    _write_pngs(tmp_path / "large", 2, 160, colour=True)
    argv = ["--data_path", str(tmp_path / "small"), "--epochs", "2"]
    assert default_preset_for_data(argv) == ["--config", "small_data", *argv]
    assert "using the small_data preset" in caplog.text
    assert default_preset_for_data([f"--data_path={tmp_path / 'large'}"]) == [f"--data_path={tmp_path / 'large'}"]
    assert default_preset_for_data(["--config", "demo", "--data_path", str(tmp_path / "small")])[:2] == [
        "--config",
        "demo",
    ]
    assert default_preset_for_data(["--data_path", str(tmp_path / "missing")]) == [
        "--data_path",
        str(tmp_path / "missing"),
    ]


def test_recipe_for_cli_keeps_flags_and_overrides(tmp_path):
    from dino.train.cli import FLAGS
    from dino.train.recipe import apply_recipe_for_cli

    _write_pngs(tmp_path / "data" / "a", 4, 64, colour=True)
    cfg = compose("train/small_data", [f"train.data_path={tmp_path / 'data'}", "crops.local_crops_size=16"])
    cfg.model.patch_size = 16
    flag_keys = {name: flag.key for flag in FLAGS for name in flag.names}
    apply_recipe_for_cli(cfg, ["--patch_size", "16", "crops.local_crops_size=16"], flag_keys)
    assert cfg.model.patch_size == 16 and cfg.crops.local_crops_size == 16  # set on the command line
    assert cfg.crops.global_crops_size == 64 and cfg.optim.epochs == 300  # derived (4 images → max epochs)
    cfg = compose("train/small_data", [f"train.data_path={tmp_path / 'data'}"])
    cfg.model.patch_size = 16
    apply_recipe_for_cli(cfg, ["--patch_size", "16"], flag_keys)
    assert cfg.crops.global_crops_size == 64 and cfg.crops.local_crops_size == 32  # multiples of the user's patch
