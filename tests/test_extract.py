"""`dino extract`: order and shapes, resume after an interruption, corrupt images skipped and listed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dino.inference.extract as extract_module
from dino.cli import dispatch
from dino.data.datasets import load_image
from dino.data.transforms import make_eval_transform
from dino.hub import save_backbone
from dino.models import build_backbone

CROP, RESIZE = 28, 32


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 14, img_size=CROP, depth=2, init_values=1.0).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_backbone(model, path)
    return path, model


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(7):
        sub = root / ("a" if i < 4 else "b")  # nested folders: the listing is recursive and sorted
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(sub / f"img{i}.png")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


def run_extract(checkpoint, source, out, *extra):
    return dispatch(
        [
            "extract",
            "--pretrained_weights",
            str(checkpoint),
            "--source",
            str(source),
            "--output_dir",
            str(out),
            "--crop_size",
            str(CROP),
            "--resize_size",
            str(RESIZE),
            "--num_workers",
            "0",
            "--batch_size",
            "2",
            "--chunk_size",
            "3",
            "--device",
            "cpu",
            "--progress",
            "false",
            *extra,
        ]
    )


def interrupt_after_one_chunk(monkeypatch, extraction) -> None:
    """Run `extraction` so that the process dies while the second chunk is being extracted."""
    real_chunk = extract_module._extract_chunk
    calls = []

    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_chunk(*args, **kwargs)

    monkeypatch.setattr(extract_module, "_extract_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extraction()
    monkeypatch.setattr(extract_module, "_extract_chunk", real_chunk)


def expected_cls(model, paths):
    transform = make_eval_transform(RESIZE, CROP)
    images = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        return torch.nn.functional.normalize(model(images), dim=-1).numpy()


def test_extract_order_shapes_and_corrupt_files(tiny_checkpoint, image_folder, tmp_path):
    checkpoint, model = tiny_checkpoint
    summary = run_extract(checkpoint, image_folder, tmp_path / "feats")
    out = tmp_path / "feats"
    features = np.load(out / "features.npy")
    paths = (out / "paths.txt").read_text().splitlines()
    good = sorted(str(p) for p in image_folder.rglob("*.png"))
    assert paths == good  # input order, the corrupt file removed
    assert features.shape == (7, 192) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(features, expected_cls(model, paths), atol=1e-4)  # row i is image i
    assert (out / "skipped.txt").read_text().splitlines() == [str(image_folder / "a" / "broken.jpg")]
    assert summary["num_skipped"] == 1 and summary["num_features"] == 7
    meta = json.loads((out / "meta.json").read_text())
    assert meta["crop_size"] == CROP and meta["settings"]["features"] == "cls"


def test_extract_pooled_patch_features_and_safetensors(tiny_checkpoint, image_folder, tmp_path):
    pytest.importorskip("safetensors")
    checkpoint, model = tiny_checkpoint
    run_extract(
        checkpoint,
        image_folder,
        tmp_path / "f",
        "--features",
        "cls_patch_mean",
        "--normalize",
        "false",
        "--output_format",
        "safetensors",
    )
    from dino.inference.extract import load_extracted

    features, paths, _ = load_extracted(tmp_path / "f")
    assert features.shape == (7, 2 * 192)
    transform = make_eval_transform(RESIZE, CROP)
    with torch.no_grad():
        out = model.forward_features(transform(load_image(paths[3])).unsqueeze(0))
    expected = torch.cat((out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1)), dim=-1)[0].numpy()
    np.testing.assert_allclose(features[3], expected, atol=1e-4)


def test_extract_resumes_after_interruption(tiny_checkpoint, image_folder, tmp_path, monkeypatch):
    checkpoint, _ = tiny_checkpoint
    out = tmp_path / "feats"
    interrupt_after_one_chunk(monkeypatch, lambda: run_extract(checkpoint, image_folder, out))
    assert sorted(p.name for p in (out / "chunks").iterdir() if p.suffix == ".txt") == ["00000.txt"]
    summary = run_extract(checkpoint, image_folder, out)
    assert summary["resumed_chunks"] == 1
    assert summary["extracted_images"] == 8 - 3  # only the images of the unfinished chunks
    fresh = run_extract(checkpoint, image_folder, tmp_path / "fresh")
    np.testing.assert_array_equal(np.load(out / "features.npy"), np.load(tmp_path / "fresh" / "features.npy"))
    assert (out / "paths.txt").read_text() == (tmp_path / "fresh" / "paths.txt").read_text()
    assert fresh["resumed_chunks"] == 0


@pytest.mark.skipif(
    not __import__("dino.inference.fast", fromlist=["x"])._HAS_ONEDNN_INT8,
    reason="PyTorch built without oneDNN int8 linear",
)
def test_extract_int8_static_calibrates_once_and_resumes_on_the_same_grids(
    tiny_checkpoint, image_folder, tmp_path, monkeypatch
):
    from dino.distributed import DeviceContext
    from dino.inference.commands import prepare_fast_model

    checkpoint, model = tiny_checkpoint
    args = ("--precision", "int8_static", "--calibration_images", "4")
    fresh = run_extract(checkpoint, image_folder, tmp_path / "fresh", *args)
    assert fresh["int8_cosine_on_calibration"] >= 0.99
    meta = json.loads((tmp_path / "fresh" / "meta.json").read_text())
    assert meta["precision"] == "int8_static" and len(meta["int8_ranges"]) == 2 * 4  # 2 blocks × 4 int8 layers
    features = np.load(tmp_path / "fresh" / "features.npy")
    paths = (tmp_path / "fresh" / "paths.txt").read_text().splitlines()
    assert (np.sum(features * expected_cls(model, paths), axis=1) >= 0.99).all()  # rows are unit vectors

    interrupt_after_one_chunk(monkeypatch, lambda: run_extract(checkpoint, image_folder, tmp_path / "resumed", *args))
    resumed = run_extract(checkpoint, image_folder, tmp_path / "resumed", *args)
    assert resumed["resumed_chunks"] == 1
    np.testing.assert_array_equal(np.load(tmp_path / "resumed" / "features.npy"), features)

    # the stored grids alone rebuild the same int8 model (how `dino search` embeds new queries)
    restored, _ = prepare_fast_model(model, "int8_static", False, DeviceContext.create("cpu"), meta["int8_ranges"])
    images = torch.stack([make_eval_transform(RESIZE, CROP)(load_image(p)) for p in paths])
    with torch.no_grad():
        again = torch.nn.functional.normalize(restored(images), dim=-1).numpy()
    np.testing.assert_allclose(again, features, atol=1e-5)


def test_extract_refuses_a_folder_of_another_image_list(tiny_checkpoint, image_folder, tmp_path):
    from dino.errors import UserError

    checkpoint, _ = tiny_checkpoint
    run_extract(checkpoint, image_folder, tmp_path / "f")
    listing = tmp_path / "list.txt"
    listing.write_text(str(next(image_folder.rglob("*.png"))) + "\n")
    with pytest.raises(UserError, match="different image list"):
        run_extract(checkpoint, listing, tmp_path / "f")
    with pytest.raises(UserError, match="other settings"):
        run_extract(checkpoint, image_folder, tmp_path / "f", "--features", "patch_mean")


def test_cli_help(capsys):
    from dino.cli import main

    main(["--help"])
    assert "extract" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "--help"])
    assert exit_info.value.code == 0
    assert "--source" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["extrct"])
    assert exit_info.value.code == 2
    assert "extract" in capsys.readouterr().err


def test_python_m_dino_help():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "dino", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0 and "duplicates" in done.stdout
