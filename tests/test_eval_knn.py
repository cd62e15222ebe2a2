"""Weighted k-NN: against an independent brute-force implementation, a hand-made case, chunking, and the CLI."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from dino.errors import UserError, run_cli
from dino.eval.knn import default_chunk_size, format_knn_table, knn_classify
from test_features import REPO_ROOT, save_tiny_vit, write_image_folder, write_train_val


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def brute_force_knn(train, train_labels, test, test_labels, k, temperature, num_classes):
    """Written independently of the package: plain loops in float64."""
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    top1 = top5 = 0
    for query, label in zip(test, test_labels):
        sims = []
        for row, row_label in zip(train, train_labels):
            cosine = float(query @ row) / (math.sqrt(float(query @ query)) * math.sqrt(float(row @ row)))
            sims.append((cosine, int(row_label)))
        sims.sort(key=lambda pair: -pair[0])
        votes = [0.0] * num_classes
        for cosine, row_label in sims[:k]:
            votes[row_label] += math.exp(cosine / temperature)
        ranking = sorted(range(num_classes), key=lambda c: -votes[c])
        top1 += ranking[0] == int(label)
        top5 += int(label) in ranking[:5]
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_matches_brute_force_on_random_features(temperature):
    generator = torch.Generator().manual_seed(0)
    num_classes = 7
    centres = torch.randn(num_classes, 16, generator=generator)
    train_labels = torch.randint(0, num_classes, (120,), generator=generator)
    test_labels = torch.randint(0, num_classes, (40,), generator=generator)
    # noisy class centres: accuracies strictly between 0 and 100, so a wrong vote rule shows
    train = centres[train_labels] + 1.5 * torch.randn(120, 16, generator=generator)
    test = centres[test_labels] + 1.5 * torch.randn(40, 16, generator=generator)
    results = knn_classify(train, train_labels, test, test_labels, k_values=(5, 20), temperature=temperature)
    for k in (5, 20):
        expected = brute_force_knn(
            train.numpy(), train_labels.numpy(), test.numpy(), test_labels.numpy(), k, temperature, num_classes
        )
        assert results[k] == pytest.approx(expected)
    assert 0 < results[20][0] < 100


def test_hand_made_case_where_the_temperature_decides():
    # query [1, 0]: one class-0 neighbour at cosine 1, two class-1 neighbours at cos 20° ≈ 0.940.
    # weight ratio exp((1 - 0.940)/T): 2.37 at T=0.07 (> 2: class 0 wins), 1.13 at T=0.5 (< 2: class 1 wins)
    angle = math.radians(20)
    train = torch.tensor(
        [[1.0, 0.0], [math.cos(angle), math.sin(angle)], [math.cos(angle), -math.sin(angle)], [-1.0, 0.0]]
    )
    train_labels = torch.tensor([0, 1, 1, 2])
    test, test_labels = torch.tensor([[3.0, 0.0]]), torch.tensor([0])
    assert knn_classify(train, train_labels, test, test_labels, (1, 3), 0.07) == {1: (100.0, None), 3: (100.0, None)}
    assert knn_classify(train, train_labels, test, test_labels, (1, 3), 0.5) == {1: (100.0, None), 3: (0.0, None)}


def test_top5_reported_from_five_classes_on():
    train = torch.eye(6)
    labels = torch.arange(6)
    results = knn_classify(train, labels, train, labels, (1,), 0.07)
    assert results == {1: (100.0, 100.0)}


def test_chunked_equals_unchunked():
    generator = torch.Generator().manual_seed(1)
    train, test = torch.randn(200, 8, generator=generator), torch.randn(53, 8, generator=generator)
    train_labels, test_labels = (
        torch.randint(0, 10, (200,), generator=generator),
        torch.randint(0, 10, (53,), generator=generator),
    )
    whole = knn_classify(train, train_labels, test, test_labels, (10, 20), chunk_size=None)
    for chunk_size in (1, 7, 53):
        assert knn_classify(train, train_labels, test, test_labels, (10, 20), chunk_size=chunk_size) == whole


def test_chunk_size_keeps_the_similarity_block_within_budget():
    assert default_chunk_size(1_281_167, budget_elements=2**28) * 1_281_167 <= 2**28
    assert default_chunk_size(10, budget_elements=100) == 10
    assert default_chunk_size(10**9, budget_elements=100) == 1


def test_k_larger_than_bank_is_clipped_with_a_warning():
    train, labels = torch.eye(3), torch.tensor([0, 1, 1])
    with pytest.warns(UserWarning, match="k=10 is larger than the 3"):
        clipped = knn_classify(train, labels, train, labels, (10,), 0.07)
    assert clipped[10] == knn_classify(train, labels, train, labels, (3,), 0.07)[3]


def test_tiny_temperature_does_not_overflow():
    train, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    assert knn_classify(train, labels, train, labels, (2,), temperature=1e-3) == {2: (100.0, None)}


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="dimension"):
        knn_classify(
            torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
        )
    with pytest.raises(UserError, match="unlabelled"):
        knn_classify(
            torch.randn(4, 3), -torch.ones(4, dtype=torch.long), torch.randn(2, 3), torch.zeros(2, dtype=torch.long)
        )


def test_table_lists_every_k():
    table = format_knn_table({10: (91.25, 99.5), 20: (90.0, None)})
    assert "91.25" in table and "99.50" in table and table.splitlines()[2].split()[-1] == "-"


# -------------------------------------------------------------------------------------------- the script


def test_help_shows_yaml_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("eval_knn").main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--nb_knn" in out and "[10, 20, 100, 200]" in out and "--batch_size_per_gpu" in out


def test_end_to_end_on_a_tiny_image_folder(tmp_path, capsys):
    data = write_train_val(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=3)
    checkpoint = save_tiny_vit(tmp_path / "tiny.pth")
    eval_knn = load_script("eval_knn")
    common = [
        "--nb_knn",
        "1",
        "5",
        "--num_workers",
        "0",
        "--batch_size_per_gpu",
        "8",
        "--device",
        "cpu",
        "--crop_size",
        "32",
        "--resize_size",
        "36",
    ]
    summary = eval_knn.main(
        [
            "--pretrained_weights",
            str(checkpoint),
            "--data_path",
            str(data),
            "--output_dir",
            str(tmp_path / "out"),
            "--dump_features",
            str(tmp_path / "feats"),
        ]
        + common
    )
    written = json.loads((tmp_path / "out" / "knn_results.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["num_train"] == 18 and written["num_val"] == 9 and written["num_classes"] == 3
    assert set(written["results"]) == {"1", "5"} and written["results"]["1"]["top5"] is None
    assert written["protocol"]["crop_size"] == 32
    # solid-colour classes: even random features of a tiny ViT separate them
    assert written["results"]["1"]["top1"] > 50

    capsys.readouterr()
    reloaded = {}
    # through the console entry point: the library's log lines (protocol, table, where the JSON went) on stdout
    run_cli(
        lambda: reloaded.update(
            eval_knn.main(["--load_features", str(tmp_path / "feats"), "--output_dir", str(tmp_path / "out2")] + common)
        )
    )
    assert reloaded["results"] == summary["results"]
    out = capsys.readouterr().out
    assert "k-NN protocol: weighted votes exp(cos/T)" in out and "top-1" in out
    assert f"results written to {tmp_path / 'out2' / 'knn_results.json'}" in out


def test_empty_data_path_uses_the_demo_dataset(tmp_path, monkeypatch):
    import dino.data.demo_dataset as demo

    data = write_train_val(tmp_path / "demo", num_classes=2, train_per_class=3, val_per_class=2)
    monkeypatch.setattr(demo, "ensure_demo_dataset", lambda *args, **kwargs: str(data))  # no 800-image generation
    summary = load_script("eval_knn").main(
        [
            "--pretrained_weights",
            str(save_tiny_vit(tmp_path / "tiny.pth")),
            "--output_dir",
            str(tmp_path / "out"),
            "--num_workers",
            "0",
            "--device",
            "cpu",
            "--crop_size",
            "32",
            "knn.nb_knn=[3]",
        ]
    )
    assert summary["protocol"]["data_path"] == str(data) and summary["num_train"] == 6


def test_wrong_patch_size_gives_the_loader_error(tmp_path):
    data = write_train_val(tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=1)
    with pytest.raises(UserError, match="patch size 8"):
        load_script("eval_knn").main(
            [
                "--pretrained_weights",
                str(save_tiny_vit(tmp_path / "tiny.pth")),
                "--patch_size",
                "16",
                "--data_path",
                str(data),
                "--device",
                "cpu",
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )


def test_class_mismatch_stops_the_script(tmp_path):
    write_image_folder(tmp_path / "data" / "train", {"cat": 2, "dog": 2})
    write_image_folder(tmp_path / "data" / "val", {"cat": 1, "cow": 1})
    with pytest.raises(UserError, match=r"only in train: \['dog'\]; only in val: \['cow'\]"):
        load_script("eval_knn").main(
            [
                "--pretrained_weights",
                str(save_tiny_vit(tmp_path / "tiny.pth")),
                "--data_path",
                str(tmp_path / "data"),
                "--device",
                "cpu",
            ]
        )


def test_missing_data_path_is_one_line_and_exit_2(tmp_path, capsys):
    eval_knn = load_script("eval_knn")
    argv = [
        "--pretrained_weights",
        str(tmp_path / "x.pth"),
        "--data_path",
        str(tmp_path / "nowhere"),
        "--device",
        "cpu",
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: eval_knn.main(argv))  # what `python eval_knn.py ...` runs
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --data_path does not exist: {tmp_path / 'nowhere'}"
    ]


def test_use_cuda_false_is_an_alias_of_device_cpu():
    with pytest.warns(FutureWarning, match="deprecated"):
        cfg, _ = load_script("eval_knn").CLI.parse(["--use_cuda", "false"])
    assert cfg.device == "cpu"
