"""Training end to end on tiny generated data: exact resume, atomic checkpoints, clear errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino.config import compose
from dino.data.demo_dataset import make_demo_image
from dino.errors import UserError
from dino.hub import load_backbone
from dino.train import checkpoint as checkpoint_module
from dino.train import loop as loop_module
from dino.train.cli import main as cli_main
from dino.train.loop import NonFiniteLossError, train
from dino.train.meta_arch import build_networks
from tests.helpers import tiny_overrides, write_image_folder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A labelled ImageFolder of 3 classes × 8 images, 32 px."""
    return write_image_folder(tmp_path_factory.mktemp("images") / "train")


def tiny_config(data_path, output_dir, *extra):
    return compose("train/demo", tiny_overrides(data_path, output_dir, 8, *extra))


def losses_by_step(output_dir):
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.parametrize(
    "recipe",
    [
        ("dino.loss_style=v1", "model.drop_path_rate=0.1"),
        (
            "dino.loss_style=v2",
            "ibot.loss_weight=1.0",
            "dino.koleo_loss_weight=0.1",
            "optim.clip_style=per_module",
            "model.drop_path_rate=0.1",
            "model.drop_path_uniform=true",
            "model.drop_path_mode=subset",
            "model.num_register_tokens=2",
        ),
        ("dino.loss_style=v2", "dino.centering=sinkhorn_knopp", "ibot.loss_weight=1.0", "ibot.separate_head=true"),
    ],
    ids=["dino_v1", "dinov2_ibot_koleo", "sinkhorn_separate_ibot_head"],
)
@pytest.mark.slow  # three interrupted-and-resumed trainings next to uninterrupted ones
def test_interrupted_and_resumed_run_gives_the_same_losses(tmp_path, image_folder, recipe):
    straight = train(tiny_config(image_folder, tmp_path / "straight", *recipe))
    assert straight.global_step == 6 and not straight.stopped_early  # 24 images / batch 8 = 3 steps × 2 epochs

    first = train(tiny_config(image_folder, tmp_path / "resumed", *recipe, "train.max_iters=4"))
    assert first.stopped_early and first.global_step == 4
    second = train(tiny_config(image_folder, tmp_path / "resumed", *recipe))
    assert second.global_step == 6

    expected, got = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "resumed")
    assert sorted(expected) == sorted(got) == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(v)) for v in expected.values())
    assert got == expected  # bit-identical, step by step

    # every step says how fast it went: images/s, MFU against the device's peak, data wait, peak memory
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    for row in steps:
        assert row["images_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_memory_mb"] > 0
        assert 0 <= row["data_wait_fraction"] <= 1 and row["step_s"] > 0

    # the teacher export loads as a backbone, in the official layout, and equals the straight run's
    a = load_backbone(str(tmp_path / "straight" / "teacher_backbone.pth"))
    b = load_backbone(str(tmp_path / "resumed" / "teacher_backbone.pth"))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert "cls_token" in a.state_dict() and "blocks.0.attn.qkv.weight" in a.state_dict()


def test_teacher_is_an_independent_copy_of_the_student(tmp_path, image_folder):
    student, teacher, _ = build_networks(tiny_config(image_folder, tmp_path))
    assert student is not teacher
    for (name, ps), (_, pt) in zip(student.named_parameters(), teacher.named_parameters()):
        assert torch.equal(ps, pt), name
        assert ps.data_ptr() != pt.data_ptr()
        assert not pt.requires_grad


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, image_folder, monkeypatch):
    cfg = tiny_config(image_folder, tmp_path, "optim.epochs=1")
    train(cfg)
    path = tmp_path / "checkpoint.pth"
    before = torch.load(path, weights_only=True)

    def exploding_save(obj, handle, *args, **kwargs):
        handle.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", exploding_save)
    with pytest.raises(OSError):
        checkpoint_module.atomic_save({"x": torch.zeros(1)}, path)
    monkeypatch.undo()
    after = torch.load(path, weights_only=True)
    assert after["global_step"] == before["global_step"]
    assert torch.equal(after["teacher"]["backbone.cls_token"], before["teacher"]["backbone.cls_token"])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, image_folder, monkeypatch):
    train(tiny_config(image_folder, tmp_path, "optim.epochs=1"))
    good = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["global_step"]
    original = loop_module.SelfDistillationObjective.forward

    def poisoned(self, *args, **kwargs):
        total, terms = original(self, *args, **kwargs)
        return total * float("nan"), terms

    monkeypatch.setattr(loop_module.SelfDistillationObjective, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        train(tiny_config(image_folder, tmp_path, "optim.epochs=2"))
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["global_step"] == good


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, image_folder, monkeypatch):
    original = loop_module.train_step
    calls = {"n": 0}

    def step_then_preempt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", step_then_preempt)
    result = train(tiny_config(image_folder, tmp_path))
    assert result.stopped_early and result.global_step == 2
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert state["global_step"] == 2 and state["step_in_epoch"] == 2


def test_unlabelled_flat_folder_trains(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        make_demo_image(i % 4, seed=i, image_size=32).save(flat / f"img{i}.jpg")
    (flat / "broken.jpg").write_bytes(b"not an image")
    with pytest.warns(UserWarning):
        result = train(tiny_config(flat, tmp_path / "out", "optim.epochs=1"))
    assert result.global_step == 1


def test_bad_inputs_are_clear_errors(tmp_path, image_folder):
    with pytest.raises(UserError, match="unknown config key 'optim.lrr'.*optim.lr"):
        tiny_config(image_folder, tmp_path, "optim.lrr=0.1")
    with pytest.raises(UserError, match="does not exist"):
        train(tiny_config(tmp_path / "missing", tmp_path / "out"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        train(tiny_config(empty, tmp_path / "out"))
    with pytest.raises(UserError, match="unknown flag '--lrr'.*--lr"):
        cli_main(["--lrr", "0.1"])
    with pytest.raises(UserError, match="model.arch must be one of .*Did you mean: vit_small"):
        train(tiny_config(image_folder, tmp_path / "out", "model.arch=vit_smal"))


def test_flags_map_onto_config_keys(tmp_path, monkeypatch):
    captured = {}
    monkeypatch.setattr(
        loop_module, "train", lambda cfg: captured.setdefault("cfg", cfg) and (_ for _ in ()).throw(SystemExit(0))
    )
    with pytest.raises(SystemExit):
        cli_main(
            [
                "--config",
                "dino_vits16",
                "--arch",
                "vit_base",
                "--batch_size_per_gpu",
                "32",
                "--out_dim",
                "4096",
                "--norm_last_layer",
                "false",
                "--global_crops_scale",
                "0.3",
                "1.0",
                "--hmp",
                "optim.lr=0.001",
            ]
        )
    cfg = captured["cfg"]
    assert cfg.model.arch == "vit_base" and cfg.train.batch_size_per_device == 32
    assert cfg.dino.head_n_prototypes == 4096 and cfg.dino.norm_last_layer is False
    assert list(cfg.crops.global_crops_scale) == [0.3, 1.0] and cfg.train.precision == "bf16" and cfg.optim.lr == 0.001


def test_main_dino_help():
    out = subprocess.run(
        [sys.executable, "main_dino.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    assert "--batch_size_per_gpu" in out.stdout and "optim.lr" in out.stdout and "dinov2_vits14" in out.stdout


def test_training_logs_pictures_to_tensorboard(tmp_path, image_folder):
    train(tiny_config(image_folder, tmp_path, "optim.epochs=1", "train.visualize_freq=1"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"features/attention", "features/pca"} <= set(events.Tags()["images"])
    assert {"train/loss", "train/teacher_entropy_batch", "train/lr", "train/teacher_temp"} <= set(
        events.Tags()["scalars"]
    )


def test_main_dino_runs_and_compares_knn_with_random_init(tmp_path):
    """The script path end to end: train on a labelled train/ split, then kNN vs a random backbone on val/."""
    write_image_folder(tmp_path / "data" / "train", per_class=8)
    write_image_folder(tmp_path / "data" / "val", per_class=3, split_seed=1)
    out = tmp_path / "run"
    args = [
        f"--data_path={tmp_path / 'data' / 'train'}",
        f"--output_dir={out}",
        "--epochs",
        "1",
        "--num_workers",
        "0",
        "--batch_size_per_device",
        "8",
        "--arch",
        "vit_tiny",
        "--patch_size",
        "8",
        "--global_crops_size",
        "32",
        "--local_crops_size",
        "16",
        "--local_crops_number",
        "1",
        "--out_dim",
        "32",
        "train.knn_eval=true",
        "model.depth=1",
        "model.embed_dim=48",
        "dino.head_hidden_dim=32",
        "dino.head_bottleneck_dim=16",
    ]
    result = cli_main(args)
    report = json.loads((out / "knn_check.json").read_text())
    assert result.knn == report
    assert (report["num_classes"], report["num_train"], report["num_val"]) == (3, 24, 9)
    for key in ("trained_top1", "random_init_top1", "raw_pixels_top1"):  # top-1 over 9 images: a multiple of 100/9
        assert report[key] * 9 / 100 == pytest.approx(round(report[key] * 9 / 100), abs=1e-6), key
    assert report["improvement"] == pytest.approx(report["trained_top1"] - report["random_init_top1"])
    assert (out / "config.yaml").read_text().count("knn_eval: true") == 1


def test_knn_monitor_logs_teacher_beside_raw_pixels_and_random_init(tmp_path):
    root = tmp_path / "data"
    write_image_folder(root / "train")
    write_image_folder(root / "val", per_class=3, split_seed=1)
    result = train(tiny_config(root / "train", tmp_path / "out", "train.knn_every_epochs=1", "optim.epochs=2"))
    assert result.global_step == 6
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    knn = [row for row in rows if "knn_teacher" in row]
    assert [row["epoch"] for row in knn] == [1, 2]
    for row in knn:
        for key in ("knn_teacher", "knn_raw_pixels", "knn_random_init"):
            assert 0.0 <= row[key] <= 100.0
    assert knn[0]["knn_raw_pixels"] == knn[1]["knn_raw_pixels"]  # the baselines are computed once
