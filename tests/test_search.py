"""`dino search` / `dino duplicates`: the image itself comes first, an exact duplicate is found above the threshold."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dino.cli import dispatch
from dino.hub import save_backbone
from dino.inference.search import TorchIndex, build_index, faiss_available, near_duplicates, search
from dino.models import build_backbone


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("search")
    model = build_backbone("vit_tiny", 14, img_size=28, depth=2, init_values=1.0).eval()
    save_backbone(model, root / "tiny.pth")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    shutil.copy(images / "img2.png", images / "img2_copy.png")  # an exact duplicate
    dispatch(
        [
            "extract",
            "--pretrained_weights",
            str(root / "tiny.pth"),
            "--source",
            str(images),
            "--output_dir",
            str(root / "feats"),
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
    return root


def test_search_returns_the_image_itself_first(extracted, tmp_path):
    images = extracted / "images"
    queries = [str(images / "img0.png"), str(images / "img4.png")]
    result = dispatch(
        [
            "search",
            "--features_dir",
            str(extracted / "feats"),
            "--queries",
            *queries,
            "--k",
            "3",
            "--output_dir",
            str(tmp_path),
            "--contact_sheet",
            "both",
            "--index",
            "torch",
        ]
    )
    for query, neighbours in zip(queries, result["results"]):
        assert neighbours[0][0] == query
        assert neighbours[0][1] == pytest.approx(1.0, abs=1e-5)
        assert len(neighbours) == 3 and neighbours[1][1] < neighbours[0][1]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved[0]["neighbours"][0]["path"] == queries[0]
    assert (tmp_path / "contact_sheet.html").read_text().count("<img") == 2 * 4
    assert Image.open(tmp_path / "contact_sheet.png").size == (4 * 128, 2 * (128 + 14))


def test_search_embeds_a_new_query_image(extracted, tmp_path):
    # a copy outside the index is embedded with the model named in meta.json and finds its original
    outside = tmp_path / "query.png"
    shutil.copy(extracted / "images" / "img5.png", outside)
    result = dispatch(
        [
            "search",
            "--features_dir",
            str(extracted / "feats"),
            "--queries",
            str(outside),
            "--k",
            "1",
            "--output_dir",
            str(tmp_path / "out"),
            "--contact_sheet",
            "none",
            "--device",
            "cpu",
        ]
    )
    path, similarity = result["results"][0][0]
    assert path == str(extracted / "images" / "img5.png") and similarity == pytest.approx(1.0, abs=1e-4)


def test_duplicates_lists_the_exact_copy(extracted, tmp_path):
    result = dispatch(
        [
            "duplicates",
            "--features_dir",
            str(extracted / "feats"),
            "--threshold",
            "0.999",
            "--output",
            str(tmp_path / "dups.csv"),
        ]
    )
    assert result["num_pairs"] == 1
    first, second, similarity = result["pairs"][0]
    assert {first.rsplit("/", 1)[1], second.rsplit("/", 1)[1]} == {"img2.png", "img2_copy.png"}
    assert similarity >= 0.999
    assert len((tmp_path / "dups.csv").read_text().splitlines()) == 2


def test_near_duplicates_threshold_and_order():
    x = np.eye(4, dtype=np.float32)
    x[3] = x[0] * 0.6 + x[1] * 0.8  # cos 0.6 with row 0, 0.8 with row 1
    pairs = near_duplicates(x, threshold=0.5, chunk_rows=2)
    assert [(p.first, p.second) for p in pairs] == [(1, 3), (0, 3)]
    assert near_duplicates(x, threshold=0.9) == []


def test_torch_index_matches_brute_force_across_chunks():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((50, 8)).astype(np.float32)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    scores, ids = TorchIndex(db, chunk_rows=7).search(q, 5)
    expected = np.argsort(-(q @ db.T), axis=1)[:, :5]
    np.testing.assert_array_equal(ids, expected)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_exact_and_ivfpq_agree_with_torch():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((2000, 16)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:5]
    _, exact = search(build_index(db, "exact"), q, 3)
    _, fallback = search(build_index(db, "torch"), q, 3)
    np.testing.assert_array_equal(exact, fallback)
    _, approx = search(build_index(db, "ivfpq", nlist=8, pq_m=4, nprobe=8), q, 1)
    assert (approx[:, 0] == np.arange(5)).mean() >= 0.8  # PQ is lossy, but the query itself should come first
