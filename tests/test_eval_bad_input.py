"""Issue 17, bad input to the k-NN evaluation: rejected before any feature is extracted; a corrupt val image is
left out and counted instead of being replaced by an image of another class."""

from __future__ import annotations

import json

import pytest
import torch

from dino.config import compose
from dino.errors import UserError
from dino.eval import features as F
from dino.eval import knn
from test_features import CPU, IndexedImages, save_tiny_vit, tiny_vit, write_train_val


@pytest.fixture()
def no_extraction(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("features were extracted although the input is invalid")

    monkeypatch.setattr(knn, "features_from_config", must_not_run)


def _knn_cfg(tmp_path, *extra):
    return compose("eval/knn", [f"output_dir={tmp_path / 'out'}", "device=cpu", *extra])


def test_nb_knn_zero_is_rejected_before_extraction(tmp_path, no_extraction):
    with pytest.raises(UserError, match="--nb_knn values must be at least 1, got 0"):
        knn.run_knn(_knn_cfg(tmp_path, "knn.nb_knn=[10,0]"))


def test_non_numeric_k_is_one_line(tmp_path, no_extraction):
    with pytest.raises(UserError, match="--nb_knn needs integers"):
        knn.run_knn(_knn_cfg(tmp_path, "knn.nb_knn=[ten]"))


def test_output_dir_that_is_a_file_is_rejected_before_extraction(tmp_path, no_extraction):
    taken = tmp_path / "taken"
    taken.write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        knn.run_knn(compose("eval/knn", [f"output_dir={taken}", "device=cpu"]))
    with pytest.raises(UserError, match="is a file, not a directory"):
        knn.run_knn(compose("eval/knn", [f"output_dir={taken / 'sub'}", "device=cpu"]))


def test_corrupt_val_image_is_skipped_and_counted_not_replaced(tmp_path):
    data = write_train_val(tmp_path / "data", num_classes=3, train_per_class=4, val_per_class=2)
    broken = data / "val" / "class_1" / "000.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    weights = save_tiny_vit(tmp_path / "tiny.pth")
    cfg = _knn_cfg(
        tmp_path,
        f"data.data_path={data}",
        f"model.pretrained_weights={weights}",
        "data.num_workers=0",
        "data.batch_size_per_device=4",
        "knn.nb_knn=[2]",
    )
    summary = knn.run_knn(cfg)
    assert summary["num_val"] == 5  # 6 val images, one unreadable: left out, not replaced
    assert summary["num_skipped_val"] == 1 and summary["num_skipped_train"] == 0
    written = json.loads((tmp_path / "out" / "knn_results.json").read_text())
    assert written["num_skipped_val"] == 1


def test_extract_readable_features_keeps_each_row_with_its_own_label(tmp_path):
    from dino.data.datasets import ImageFolderDataset
    from dino.data.transforms import make_eval_transform

    data = write_train_val(tmp_path / "data", num_classes=3, train_per_class=1, val_per_class=2)
    (data / "val" / "class_0" / "001.png").write_bytes(b"garbage")
    dataset = ImageFolderDataset(data / "val", make_eval_transform(32, 32))
    features, labels, skipped = F.extract_readable_features(tiny_vit(), dataset, CPU, batch_size=2, num_workers=0)
    assert skipped == [1]
    assert labels.tolist() == [0, 1, 1, 2, 2]  # the old code labelled the broken class_0 image as class 1
    assert features.shape[0] == 5
    # datasets without samples/transform are read as they are
    _, plain_labels, none_skipped = F.extract_readable_features(
        tiny_vit(), IndexedImages(5), CPU, batch_size=2, num_workers=0
    )
    assert plain_labels.tolist() == list(range(5)) and none_skipped == []
    assert torch.isfinite(features).all()
