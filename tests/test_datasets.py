"""Datasets, image loading, eval transforms and the procedural demo dataset."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dino.data.datasets import (
    CorruptImageError,
    ImageFolderDataset,
    SkippedImageWarning,
    UnlabeledImageDataset,
    build_dataset,
    load_image,
)
from dino.data.demo_dataset import DEMO_PATTERNS, ensure_demo_dataset, make_demo_image
from dino.data.transforms import IMAGENET_MEAN, make_eval_transform, make_linear_train_transform
from dino.errors import UserError


def write_image(path, size=(32, 32), colour=(200, 30, 60), fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return str(path)


# ---------------------------------------------------------------------------------------- detection


def test_class_folders_become_image_folder_dataset(tmp_path):
    write_image(tmp_path / "cats" / "a.jpg")
    write_image(tmp_path / "cats" / "b.PNG")  # extensions are case-insensitive
    write_image(tmp_path / "dogs" / "c.JpEg")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")

    dataset = build_dataset(tmp_path)

    assert isinstance(dataset, ImageFolderDataset)
    assert dataset.classes == ["cats", "dogs"]
    assert dataset.class_to_idx == {"cats": 0, "dogs": 1}
    assert [os.path.basename(p) for p, _ in dataset.samples] == ["a.jpg", "b.PNG", "c.JpEg"]
    assert dataset.targets == [0, 0, 1]
    image, label = dataset[2]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1


def test_flat_and_nested_folders_become_unlabeled(tmp_path):
    flat = tmp_path / "flat"
    for name in ("x.png", "y.bmp", "z.webp"):
        write_image(flat / name)
    dataset = build_dataset(flat)
    assert isinstance(dataset, UnlabeledImageDataset)
    assert len(dataset) == 3 and set(dataset.targets) == {-1}

    nested = tmp_path / "nested"
    write_image(nested / "2020" / "jan" / "a.png")
    write_image(nested / "2021" / "b.png")  # mixed depths: not a class layout
    dataset = build_dataset(nested)
    assert isinstance(dataset, UnlabeledImageDataset) and len(dataset) == 2
    assert dataset[0][1] == -1


def test_file_list_resolves_relative_paths_and_skips_comments(tmp_path):
    first = write_image(tmp_path / "data" / "one.png")
    write_image(tmp_path / "lists" / "imgs" / "two.png")
    listing = tmp_path / "lists" / "train.txt"
    listing.write_text(f"# my images\n\n{first}\nimgs/two.png\n   \n")

    dataset = build_dataset(listing)

    assert isinstance(dataset, UnlabeledImageDataset)
    assert [p for p, _ in dataset.samples] == [first, str(tmp_path / "lists" / "imgs" / "two.png")]
    assert dataset[1][1] == -1


def test_image_folder_keeps_deeper_nesting_and_warns_on_empty_class(tmp_path):
    write_image(tmp_path / "a" / "deep" / "er" / "1.png")
    write_image(tmp_path / "b" / "2.png")
    os.makedirs(tmp_path / "c_empty")
    with pytest.warns(UserWarning, match="c_empty"):
        dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ["a", "b", "c_empty"]
    assert dataset.targets == [0, 1]


def test_image_folder_with_given_mapping(tmp_path):
    write_image(tmp_path / "b" / "1.png")
    dataset = ImageFolderDataset(tmp_path, class_to_idx={"a": 0, "b": 1})
    assert dataset.targets == [1] and dataset.classes == ["a", "b"]
    write_image(tmp_path / "zzz" / "1.png")
    with pytest.raises(UserError, match="zzz"):
        ImageFolderDataset(tmp_path, class_to_idx={"a": 0, "b": 1})


# ------------------------------------------------------------------------------------ user errors


def test_bad_paths_raise_user_error_at_construction(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_dataset(tmp_path / "missing")
    os.makedirs(tmp_path / "empty" / "sub")
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    with pytest.raises(UserError, match="no images"):
        build_dataset(tmp_path / "empty")
    (tmp_path / "list.txt").write_text("# nothing\n\n")
    with pytest.raises(UserError, match="names no images"):
        build_dataset(tmp_path / "list.txt")
    (tmp_path / "wrong.txt").write_text("nope/a.png\nnope/b.png\n")
    with pytest.raises(UserError, match="exist"):
        build_dataset(tmp_path / "wrong.txt")
    single = write_image(tmp_path / "single.png")
    with pytest.raises(UserError, match="folder of images or a .txt"):
        build_dataset(single)


# ------------------------------------------------------------------------------------ corrupt files


def make_folder_with_corrupt_files(root):
    good = [write_image(root / f"good{i}.png", colour=(10 * i, 0, 0)) for i in range(3)]
    (root / "good0b_garbage.jpg").write_bytes(b"this is not a jpeg at all")
    png_bytes = open(good[0], "rb").read()
    (root / "good1b_truncated.png").write_bytes(png_bytes[: len(png_bytes) // 2])
    return good


def test_load_image_names_the_corrupt_file(tmp_path):
    make_folder_with_corrupt_files(tmp_path)
    with pytest.raises(CorruptImageError, match="good0b_garbage.jpg") as info:
        load_image(tmp_path / "good0b_garbage.jpg")
    assert isinstance(info.value, UserError)
    with pytest.raises(CorruptImageError, match="truncated"):
        load_image(tmp_path / "good1b_truncated.png")


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    good = make_folder_with_corrupt_files(tmp_path)
    dataset = build_dataset(tmp_path)
    assert len(dataset) == 5 and dataset.num_skipped == 0

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reds = [dataset[i][0].getpixel((0, 0))[0] for i in range(len(dataset))]
        reds_again = [dataset[i][0].getpixel((0, 0))[0] for i in range(len(dataset))]

    # Order is good0, garbage, good1, truncated, good2: each bad one falls through to the next good one.
    assert reds == [0, 10, 10, 20, 20] and reds_again == reds
    assert dataset.num_skipped == 2
    assert sorted(os.path.basename(p) for p in dataset.skipped_paths) == ["good0b_garbage.jpg", "good1b_truncated.png"]
    skip_warnings = [w for w in caught if issubclass(w.category, SkippedImageWarning)]
    assert len(skip_warnings) == 2  # once per bad file, not once per access
    assert len(good) == 3


def test_skipping_works_in_dataloader_workers(tmp_path):
    make_folder_with_corrupt_files(tmp_path)
    dataset = build_dataset(tmp_path, transform=lambda img: torch.tensor(img.getpixel((0, 0))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ((batch, labels),) = list(loader)
    assert batch[:, 0].tolist() == [0, 10, 10, 20, 20]
    assert dataset.num_skipped == 2  # recorded in shared memory by the worker processes


def test_all_unreadable_raises_user_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"broken")
    dataset = build_dataset(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match="could be read"):
            dataset[0]


# ------------------------------------------------------------------------------------ pixel modes


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")  # 16-bit PNG
    Image.fromarray(values).save(tmp_path / "deep.tif")
    for name in ("deep.png", "deep.tif"):
        rgb = np.asarray(load_image(tmp_path / name))
        assert rgb.shape == (1, 4, 3) and rgb.dtype == np.uint8
        assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]
        assert (rgb[..., 0] == rgb[..., 2]).all()


def test_thirty_two_bit_integer_mode(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), mode="I").save(tmp_path / "i32.tif")
    assert np.asarray(load_image(tmp_path / "i32.tif"))[0, :, 1].tolist() == [0, 128, 255]


def test_palette_with_transparency_goes_on_white(tmp_path):
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    palette_image.save(tmp_path / "pal.png", transparency=0)  # index 0 (red) is transparent
    palette_image.save(tmp_path / "pal.gif")
    assert np.asarray(load_image(tmp_path / "pal.png")).tolist() == [[[255, 255, 255], [0, 0, 255]]]
    assert np.asarray(load_image(tmp_path / "pal.gif")).tolist() == [[[255, 0, 0], [0, 0, 255]]]


def test_alpha_and_grayscale_modes(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(10, 20, 30, 255), (10, 20, 30, 0), (0, 0, 0, 128)])
    rgba.save(tmp_path / "rgba.png")
    got = np.asarray(load_image(tmp_path / "rgba.png")).astype(int)
    assert got[0, 0].tolist() == [10, 20, 30]
    assert got[0, 1].tolist() == [255, 255, 255]
    assert np.abs(got[0, 2] - 127).max() <= 1  # half-transparent black over white

    la = Image.new("LA", (1, 1), (40, 0))
    la.save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png")).tolist() == [[[255, 255, 255]]]

    Image.new("L", (2, 2), 77).save(tmp_path / "gray.pgm")
    assert np.asarray(load_image(tmp_path / "gray.pgm")).reshape(-1, 3).tolist() == [[77, 77, 77]] * 4


def test_exif_orientation_is_honoured(tmp_path):
    # 40×20 image, left half red; Orientation 6 means "rotate 90° clockwise to display".
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    loaded = load_image(tmp_path / "rotated.jpg")

    assert loaded.size == (20, 40)  # portrait once rotated
    pixels = np.asarray(loaded).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # the red half is now on top
    assert pixels[35, 10, 0] < 60


# ------------------------------------------------------------------------------------ eval transforms


def test_eval_transform_shapes_and_normalisation(tmp_path):
    mean_colour = tuple(round(m * 255) for m in IMAGENET_MEAN)
    image = Image.new("RGB", (50, 40), mean_colour)
    out = make_eval_transform(resize_size=36, crop_size=32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.abs().max() < 0.02  # the ImageNet mean colour normalises to ~0
    train_out = make_linear_train_transform(crop_size=24)(image)
    assert train_out.shape == (3, 24, 24)
    with pytest.raises(ValueError):
        make_eval_transform(resize_size=16, crop_size=32)


# ------------------------------------------------------------------------------------ demo dataset


def test_demo_dataset_is_complete_deterministic_and_reused(tmp_path):
    kwargs = dict(num_classes=3, train_per_class=4, val_per_class=2, image_size=16, seed=3)
    first = ensure_demo_dataset(tmp_path / "a", **kwargs)
    second = ensure_demo_dataset(tmp_path / "b", **kwargs)

    train, val = build_dataset(os.path.join(first, "train")), build_dataset(os.path.join(first, "val"))
    assert isinstance(train, ImageFolderDataset) and isinstance(val, ImageFolderDataset)
    assert len(train) == 12 and len(val) == 6 and train.classes == list(DEMO_PATTERNS[:3]) == val.classes
    for split, cls, name in (("train", DEMO_PATTERNS[0], "0000.png"), ("val", DEMO_PATTERNS[2], "0001.png")):
        a = np.asarray(Image.open(os.path.join(first, split, cls, name)))
        b = np.asarray(Image.open(os.path.join(second, split, cls, name)))
        assert a.shape == (16, 16, 3) and np.array_equal(a, b)

    # A complete copy is reused untouched; a damaged one is regenerated.
    probe = os.path.join(first, "train", DEMO_PATTERNS[1], "0002.png")
    stamp = os.stat(probe).st_mtime_ns
    assert ensure_demo_dataset(tmp_path / "a", **kwargs) == first and os.stat(probe).st_mtime_ns == stamp
    os.remove(probe)
    assert ensure_demo_dataset(tmp_path / "a", **kwargs) == first and os.path.exists(probe)
    assert not [n for n in os.listdir(tmp_path / "a") if n.startswith(".")]  # no staging folders left

    other_seed = ensure_demo_dataset(tmp_path / "a", **{**kwargs, "seed": 4})
    assert other_seed != first
    assert not np.array_equal(np.asarray(Image.open(probe)), np.asarray(Image.open(probe.replace(first, other_seed))))


def test_demo_dataset_rejects_bad_settings(tmp_path):
    with pytest.raises(UserError):
        ensure_demo_dataset(tmp_path, num_classes=len(DEMO_PATTERNS) + 1)
    with pytest.raises(UserError):
        ensure_demo_dataset(tmp_path, train_per_class=0)


def test_demo_default_root_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_CACHE_DIR", str(tmp_path / "cache"))
    path = ensure_demo_dataset(num_classes=1, train_per_class=1, val_per_class=1, image_size=8)
    assert path.startswith(str(tmp_path / "cache" / "demo_dataset"))


def nearest_class_mean_accuracy(train_x, train_y, test_x, test_y):
    classes = np.unique(train_y)
    means = np.stack([train_x[train_y == c].mean(0) for c in classes])
    predicted = classes[np.argmin(((test_x[:, None] - means[None]) ** 2).sum(-1), axis=1)]
    return float((predicted == test_y).mean())


def mean_rgb_features(make, n_per_class, seed_offset):
    x, y = [], []
    for c in range(len(DEMO_PATTERNS)):
        for i in range(n_per_class):
            x.append(np.asarray(make(c, (seed_offset, c, i)), dtype=float).mean(axis=(0, 1)))
            y.append(c)
    return np.array(x), np.array(y)


def test_demo_classes_are_not_separable_by_mean_colour():
    def demo(c, seed):
        return make_demo_image(c, seed, image_size=24)

    def colour_coded(c, seed):  # control: what a colour-leaking dataset would look like
        return Image.new("RGB", (4, 4), (30 * c, 255 - 30 * c, 100))

    chance = 1 / len(DEMO_PATTERNS)
    train = mean_rgb_features(demo, 40, seed_offset=0)
    test = mean_rgb_features(demo, 25, seed_offset=1)
    assert nearest_class_mean_accuracy(*train, *test) < 2 * chance

    control_train, control_test = mean_rgb_features(colour_coded, 2, 0), mean_rgb_features(colour_coded, 2, 1)
    assert nearest_class_mean_accuracy(*control_train, *control_test) == 1.0


def test_make_demo_image_is_deterministic():
    a = np.asarray(make_demo_image("triangle", seed=5, image_size=20))
    b = np.asarray(make_demo_image(DEMO_PATTERNS.index("triangle"), seed=5, image_size=20))
    c = np.asarray(make_demo_image("triangle", seed=6, image_size=20))
    assert a.shape == (20, 20, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError):
        make_demo_image("hexagon")
