"""Issue 17: a huge image is decoded only to the size the transform needs (JPEG draft, box reduce), with the
same colours, orientation and errors as the full decode, and the same features up to resampling noise."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dino.data.datasets import CorruptImageError, load_image
from dino.data.transforms import REDUCING_GAP, load_image_for, make_eval_transform


def _smooth(width: int, height: int) -> Image.Image:
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None] * np.ones((1, width), np.float32)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :] * np.ones((height, 1), np.float32)
    rgb = np.stack([0.5 * (x + y), x, 255 - y], -1)
    rgb[: height // 3, : width // 4] = (200, 30, 30)  # a block, so orientation mistakes show
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def big_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    image = _smooth(4000, 3000)
    image.save(folder / "big.jpg", quality=92)
    image.save(folder / "big.png", compress_level=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    image.save(folder / "rotated.jpg", quality=92, exif=exif.tobytes())
    image.convert("P").save(folder / "palette.png")
    return folder


def test_jpeg_is_decoded_at_reduced_scale(big_files):
    image = load_image_for(big_files / "big.jpg", 256)
    # DCT scaling to 1/4: the largest scale whose shorter side stays ≥ 2 × 256
    assert image.size == (1000, 750) and image.mode == "RGB"
    assert min(image.size) >= REDUCING_GAP * 256


@pytest.mark.parametrize("name", ["big.jpg", "big.png", "palette.png"])
def test_reduced_decode_gives_the_features_input_of_the_full_decode(big_files, name):
    transform = make_eval_transform(256, 224)
    assert transform.min_decode_side == 256
    full = transform(load_image(big_files / name))
    reduced = transform(load_image_for(big_files / name, transform.min_decode_side))
    assert reduced.shape == full.shape
    assert float((full - reduced).abs().mean()) < 0.02  # normalised units: well under one grey level on average
    if name == "big.png":
        assert load_image_for(big_files / name, 256).size == (800, 600)  # box-reduced by 5: 600 ≥ 2 × 256


def test_exif_orientation_is_kept(big_files):
    full = load_image(big_files / "rotated.jpg")
    reduced = load_image_for(big_files / "rotated.jpg", 256)
    assert full.size == (3000, 4000) and reduced.size[0] < reduced.size[1]
    small_full = np.asarray(full.resize(reduced.size, Image.BILINEAR), dtype=np.float32)
    assert np.abs(small_full - np.asarray(reduced, dtype=np.float32)).mean() < 4


def test_small_images_and_no_size_decode_exactly_as_before(tmp_path, big_files):
    path = tmp_path / "small.png"
    _smooth(300, 200).save(path)
    assert np.array_equal(np.asarray(load_image_for(path, 256)), np.asarray(load_image(path)))
    assert np.array_equal(
        np.asarray(load_image_for(big_files / "big.png", None)), np.asarray(load_image(big_files / "big.png"))
    )


def test_corrupt_files_raise_the_same_error(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        load_image_for(path, 256)


def test_extraction_and_eval_datasets_decode_reduced(big_files, monkeypatch):
    import dino.data.transforms as transforms_module
    from dino.inference.extract import PathDataset

    calls = []
    real = transforms_module.load_image_for
    monkeypatch.setattr(transforms_module, "load_image_for", lambda path, side: calls.append(side) or real(path, side))
    transform = make_eval_transform(64, 56)
    images, _, ok = PathDataset([str(big_files / "big.jpg")], transform, 56)[0]
    assert bool(ok) and tuple(images.shape) == (3, 56, 56)
    assert calls == [64]


def test_min_decode_side_of_the_training_augmentation():
    from dino.data.augmentations import DataAugmentationDINO
    from dino.data.transforms import min_decode_side, random_resized_crop_min_side

    # the smallest local crop of DINO v1 (5 % of the area, ratio 3/4) must still give 96 px: 496 px
    assert random_resized_crop_min_side(96, 0.05) == 496
    augmentation = DataAugmentationDINO(
        global_crops_scale=(0.4, 1.0),
        local_crops_scale=(0.05, 0.4),
        local_crops_number=8,
        global_crops_size=224,
        local_crops_size=96,
    )
    assert min_decode_side(augmentation) == 496
    assert min_decode_side(make_eval_transform(256, 224)) == 256
    assert min_decode_side(lambda image: image) is None
