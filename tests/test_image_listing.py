"""The one image lister (issue 17: FIFOs, symlink loops, unreadable folders) behind training, extraction and eval."""

import os
import threading
import warnings

import pytest

import dino.data.datasets as datasets_module
from dino.data.datasets import CorruptImageError, SkippedImageWarning, build_dataset, list_images, load_image
from dino.inference.extract import list_input_images
from tests.helpers import write_image_folder


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "images", per_class=2)


def _with_deadline(fn, seconds=20):
    """Run `fn` in a thread; fail (instead of hanging the suite) when it blocks, as reading a FIFO does."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as err:  # re-raised in the test's thread
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked (a FIFO was opened)"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_a_fifo_named_like_an_image_is_skipped_and_counted(folder):
    fifo = folder / "rings" / "trap.jpg"
    os.mkfifo(fifo)
    with pytest.warns(SkippedImageWarning, match="not a regular file"):
        listing = _with_deadline(lambda: list_images(folder))
    assert str(fifo) not in listing and len(listing) == 6
    assert listing.skipped == [(str(fifo), "not a regular file")]
    with pytest.warns(SkippedImageWarning):
        assert len(_with_deadline(lambda: list_input_images(folder))) == 6  # extraction
    with pytest.warns(SkippedImageWarning):
        assert len(_with_deadline(lambda: build_dataset(str(folder)))) == 6  # training / eval datasets
    # named directly (e.g. in a .txt list), it is an unreadable image, not a hang
    with pytest.raises(CorruptImageError, match="not a regular file"):
        _with_deadline(lambda: load_image(fifo))


def test_a_symlink_loop_lists_each_image_once(folder):
    (folder / "rings" / "loop").symlink_to(folder)
    (folder / "again").symlink_to(folder / "rings")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here is skipped: loops are just not walked twice
        listing = list_images(folder)
    assert len(listing) == 6 == len({os.path.realpath(p) for p in listing})
    assert all(p.startswith(str(folder)) for p in listing)


def test_an_unreadable_sub_folder_is_counted_as_skipped(folder, monkeypatch):
    locked = folder / "checkerboard"
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    # root reads any folder regardless of its mode, so the refusal is simulated where the lister reads
    monkeypatch.setattr(datasets_module.os, "scandir", scandir)
    with pytest.warns(SkippedImageWarning, match="checkerboard: unreadable folder"):
        listing = list_images(folder)
    assert len(listing) == 4 and listing.skipped == [(str(locked), "unreadable folder (Permission denied)")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_an_unreadable_sub_folder_for_real(folder):
    locked = folder / "checkerboard"
    locked.chmod(0)
    try:
        with pytest.warns(SkippedImageWarning, match="unreadable folder"):
            assert len(list_images(folder)) == 4
    finally:
        locked.chmod(0o755)


def test_a_broken_link_named_like_an_image_is_counted(folder):
    (folder / "rings" / "gone.png").symlink_to(folder / "nowhere.png")
    with pytest.warns(SkippedImageWarning, match="gone.png: cannot stat"):
        assert len(list_images(folder)) == 6


def test_extraction_counts_what_the_listing_skipped(tmp_path, folder, monkeypatch):
    import torch

    from dino.data.transforms import make_eval_transform
    from dino.inference.extract import ExtractionSettings, extract_features_to_folder
    from dino.models import build_backbone

    locked = folder / "checkerboard"
    os.mkfifo(folder / "rings" / "trap.png")
    real_scandir = os.scandir
    monkeypatch.setattr(
        datasets_module.os,
        "scandir",
        lambda path: (
            (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
            if os.fspath(path) == str(locked)
            else real_scandir(path)
        ),
    )
    with pytest.warns(SkippedImageWarning):
        paths = list_input_images(folder)
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 8, img_size=32, depth=1, embed_dim=48).eval()
    summary = extract_features_to_folder(
        model,
        paths,
        tmp_path / "feats",
        make_eval_transform(32, 32),
        32,
        ExtractionSettings(num_workers=0, progress=False),
    )
    assert summary["num_features"] == 4 and summary["num_skipped"] == 2  # not "0 skipped"
    assert set((tmp_path / "feats" / "skipped.txt").read_text().splitlines()) == {
        str(locked),
        str(folder / "rings" / "trap.png"),
    }
