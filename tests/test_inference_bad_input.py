"""Issue 17, bad input to `dino extract / search / duplicates`: refused with one line, never silently wrong."""

from __future__ import annotations

import csv
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dino.cli import dispatch
from dino.errors import UserError
from dino.hub import save_backbone
from dino.inference.extract import decode_path_line, encode_path_line, load_extracted
from dino.models import build_backbone


def _tiny(seed: int):
    torch.manual_seed(seed)
    return build_backbone("vit_tiny", 14, img_size=28, depth=1, init_values=1.0).eval()


def _extract(weights, source, output):
    return dispatch(
        [
            "extract",
            "--pretrained_weights",
            str(weights),
            "--source",
            str(source),
            "--output_dir",
            str(output),
            "--crop_size",
            "28",
            "--resize_size",
            "32",
            "--num_workers",
            "0",
            "--device",
            "cpu",
            "--progress",
            "false",
        ]
    )


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_search")
    save_backbone(_tiny(0), root / "tiny.pth")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    names = ["a.png", "line\nbreak.png", "carriage\rreturn.png", "back\\slash,comma.png", "sep\u2028arator.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / name)
    shutil.copy(images / "a.png", images / "a_copy.png")
    _extract(root / "tiny.pth", images, root / "feats")
    return root


def _search(root, tmp_path, *extra):
    return dispatch(
        [
            "search",
            "--features_dir",
            str(root / "feats"),
            "--output_dir",
            str(tmp_path / "out"),
            "--contact_sheet",
            "none",
            "--device",
            "cpu",
            "--index",
            "torch",
            *extra,
        ]
    )


def test_file_names_with_line_breaks_survive_extract_and_search(extracted, tmp_path):
    features, paths, _ = load_extracted(extracted / "feats")
    assert len(paths) == len(features) == 6
    odd = str(extracted / "images" / "line\nbreak.png")
    assert odd in paths
    result = _search(extracted, tmp_path, "--queries", odd, "--k", "1")
    assert result["results"][0][0][0] == odd
    for name in ("x\ny", "a\\nb", "c\\", "\r\n", "plain", "d\u2028e"):
        assert decode_path_line(encode_path_line(name)) == name
        assert "\n" not in encode_path_line(name)


def test_search_k_zero_is_refused(extracted, tmp_path):
    with pytest.raises(UserError, match="--k must be an integer ≥ 1, got 0"):
        _search(extracted, tmp_path, "--queries", str(extracted / "images" / "a.png"), "--k", "0")


def test_duplicates_threshold_outside_cosine_range_is_refused(extracted, tmp_path):
    with pytest.raises(UserError, match="not a cosine similarity"):
        dispatch(
            [
                "duplicates",
                "--features_dir",
                str(extracted / "feats"),
                "--threshold",
                "7",
                "--output",
                str(tmp_path / "d.csv"),
            ]
        )
    result = dispatch(
        [
            "duplicates",
            "--features_dir",
            str(extracted / "feats"),
            "--threshold",
            "0.99",
            "--output",
            str(tmp_path / "d.csv"),
        ]
    )
    assert result["num_pairs"] == 1
    rows = list(csv.reader(open(tmp_path / "d.csv", encoding="utf-8", newline="")))
    assert all(len(row) == 3 for row in rows)


def test_search_refuses_weights_that_changed_since_extraction(extracted, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(extracted, root)
    # an extraction whose meta.json names a weights file this test may replace
    _extract(root / "tiny.pth", root / "images", root / "feats2")
    query = tmp_path / "query.png"
    shutil.copy(root / "images" / "a.png", query)
    args = [
        "search",
        "--features_dir",
        str(root / "feats2"),
        "--queries",
        str(query),
        "--k",
        "1",
        "--output_dir",
        str(tmp_path / "out"),
        "--contact_sheet",
        "none",
        "--device",
        "cpu",
        "--index",
        "torch",
    ]
    assert dispatch(args)["results"][0][0][1] == pytest.approx(1.0, abs=1e-4)
    save_backbone(_tiny(1), root / "tiny.pth")  # another model now sits at the recorded path
    with pytest.raises(UserError, match="not those the features .* were extracted with"):
        dispatch(args)


def _copy_feats(extracted, tmp_path):
    folder = tmp_path / "feats"
    shutil.copytree(extracted / "feats", folder)
    return folder


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_features_file_is_refused(extracted, tmp_path, capsys):
    folder = _copy_feats(extracted, tmp_path)
    np.save(folder / "features.npy", np.array([_Payload()] * 6, dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="features.npy: not a plain numeric .npy array"):
        load_extracted(folder)
    assert "unpickled!" not in capsys.readouterr().out
    with open(folder / "features.npy", "wb") as handle:  # a bare pickle under the .npy name
        pickle.dump({"x": 1}, handle)
    with pytest.raises(UserError, match="features.npy"):
        load_extracted(folder)


def test_garbage_features_file_is_refused(extracted, tmp_path):
    folder = _copy_feats(extracted, tmp_path)
    (folder / "features.npy").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(UserError, match="features.npy"):
        load_extracted(folder)
    np.save(folder / "features.npy", np.array(["a", "b"]))  # an array, but not numbers
    with pytest.raises(UserError, match="not a 2-D numeric feature matrix"):
        load_extracted(folder)


def test_non_utf8_file_list_is_one_line(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.png\n\xff\xfe broken.png\n")
    save_backbone(_tiny(0), tmp_path / "tiny.pth")
    with pytest.raises(UserError, match="not UTF-8 text .* line 2"):
        _extract(tmp_path / "tiny.pth", listing, tmp_path / "feats")


def test_non_utf8_training_list_is_reported_by_the_validator(tmp_path):
    from dino.config import compose
    from dino.config_validation import validate_training_config

    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xe9t\xe9.png\n")
    with pytest.raises(UserError, match="not UTF-8 text"):
        validate_training_config(
            compose("train/demo", [f"train.data_path={listing}", f"train.output_dir={tmp_path / 'o'}"])
        )
