"""Issue 17, bad input to training: the whole config is checked before anything is built, and a resumed run's
config is checked against its checkpoint before config.yaml is overwritten."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dino.config import compose
from dino.config_validation import (
    check_resume_compatible,
    output_dir_problem,
    validate_training_config,
)
from dino.errors import UserError
from dino.train import cli as train_cli
from tests.helpers import tiny_overrides, write_image_folder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), per_class=4)


def _fail_fast(monkeypatch):
    """Anything past validation (data, networks, config.yaml) would be a failure of these tests."""
    import dino.train.loop as loop

    def must_not_run(*args, **kwargs):
        raise AssertionError("the training loop started although the config is invalid")

    monkeypatch.setattr(loop, "train", must_not_run)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["optim.lr=abc"], "optim.lr must be a number, got 'abc'"),
        (["--lr", "-0.1"], "optim.lr must be ≥ 0"),
        (["--batch_size_per_device", "0"], "train.batch_size_per_device must be ≥ 1"),
        (["--batch_size_per_device", "1"], "at least 2 with KoLeo"),
        (["--out_dim", "0"], "dino.head_n_prototypes must be ≥ 1"),
        (["--global_crops_scale", "0.6", "0.3"], "crops.global_crops_scale must satisfy 0 < min ≤ max ≤ 1"),
        (["--local_crops_scale", "0", "0.4"], "crops.local_crops_scale"),
        (["--global_crops_scale", "0.4", "1.5"], "crops.global_crops_scale"),
        (["--num_workers", "-1"], "train.num_workers must be ≥ 0"),
        (["--momentum_teacher", "2"], "teacher.momentum_teacher must be ≥ 0 and ≤ 1"),
        (["--epochs", "0"], "optim.epochs must be ≥ 1"),
        (["--teacher_temp", "0"], "teacher.teacher_temp must be > 0"),
        (["--arch", "vit_smal"], "vit_small"),
    ],
)
def test_invalid_values_are_one_user_error_before_training(argv, fragment, tmp_path, monkeypatch):
    _fail_fast(monkeypatch)
    with pytest.raises(UserError) as err:
        train_cli.main(["--output_dir", str(tmp_path / "out"), *argv])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing was created


def test_every_problem_is_reported_at_once(tmp_path, monkeypatch):
    _fail_fast(monkeypatch)
    with pytest.raises(UserError) as err:
        train_cli.main(["--output_dir", str(tmp_path), "--epochs", "0", "--num_workers", "-1", "optim.lr=abc"])
    message = str(err.value)
    assert "3 problems" in message
    for key in ("optim.epochs", "train.num_workers", "optim.lr"):
        assert key in message


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path, monkeypatch):
    _fail_fast(monkeypatch)
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    with pytest.raises(UserError, match="exists and is not a directory"):
        train_cli.main(["--output_dir", str(a_file)])
    with pytest.raises(UserError, match="is a file, not a directory"):
        train_cli.main(["--output_dir", str(a_file / "run")])


def test_unwritable_output_dir(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = __import__("os").access
    # as root, chmod cannot make a folder unwritable: stand in for the kernel's answer
    monkeypatch.setattr("os.access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    assert "not writable" in output_dir_problem(locked / "run")
    assert output_dir_problem(tmp_path / "fresh" / "run") is None


def test_every_preset_is_valid():
    from dino.config import list_presets

    for preset in list_presets("train"):
        validate_training_config(compose(f"train/{preset}"))


def test_missing_data_path_is_reported_before_any_scan(tmp_path, monkeypatch):
    _fail_fast(monkeypatch)
    with pytest.raises(UserError, match="train.data_path does not exist"):
        train_cli.main(["--output_dir", str(tmp_path), "--data_path", str(tmp_path / "nope")])


def test_cli_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "main_dino.py", "--output_dir", str(tmp_path / "o"), "optim.lr=abc", "--num_workers", "-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "optim.lr" in errors[0] and "train.num_workers" in errors[0]


# ------------------------------------------------------------------------------------------------ resume


def _cfg(*extra):
    return compose("train/demo", list(extra))


def test_resume_check_names_what_differs():
    saved = _cfg("model.arch=vit_small", "dino.head_n_prototypes=128", "train.batch_size_per_device=64")
    now = _cfg("model.arch=vit_tiny", "dino.head_n_prototypes=64", "train.batch_size_per_device=32")
    with pytest.raises(UserError) as err:
        check_resume_compatible(saved, now)
    message = str(err.value)
    assert "model.arch 'vit_small' → 'vit_tiny'" in message
    assert "dino.head_n_prototypes 128 → 64" in message
    assert "train.batch_size_per_device 64 → 32" in message
    check_resume_compatible(saved, saved.copy())  # the same config resumes
    # more epochs or another lr are legitimate changes on resume
    check_resume_compatible(
        saved,
        _cfg(
            "model.arch=vit_small",
            "dino.head_n_prototypes=128",
            "train.batch_size_per_device=64",
            "optim.epochs=40",
            "optim.lr=0.002",
        ),
    )


def test_resume_check_compares_the_global_batch_when_world_sizes_are_known():
    saved = _cfg("train.batch_size_per_device=64")
    now = _cfg("train.batch_size_per_device=32")
    check_resume_compatible(saved, now, saved_world_size=1, world_size=2)  # 64 × 1 == 32 × 2
    with pytest.raises(UserError, match="global batch 64"):
        check_resume_compatible(saved, now, saved_world_size=1, world_size=1)


@pytest.mark.parametrize(
    "changed, fragment",
    [
        (["dino.head_n_prototypes=32"], "dino.head_n_prototypes 64 → 32"),
        (["model.arch=vit_small"], "model.arch 'vit_tiny' → 'vit_small'"),
        # the checkpoint records its world size, so the global batch is what is compared
        (["train.batch_size_per_device=6"], "batch 8 (1 × 8) → 6 (1 × 6)"),
    ],
)
def test_resume_with_a_changed_config_is_refused_before_config_yaml_is_written(
    tmp_path, image_folder, changed, fragment
):
    output = tmp_path / "run"
    base = tiny_overrides(image_folder, output, 8, "train.max_iters=1", "dino.koleo_loss_weight=0")
    train_cli.main(base)
    config_before = (output / "config.yaml").read_text()
    with pytest.raises(UserError) as err:
        train_cli.main(base + changed + ["train.max_iters=2"])
    assert fragment in str(err.value) and "--resume false" in str(err.value)
    assert (output / "config.yaml").read_text() == config_before
    # the unchanged config still resumes
    result = train_cli.main(base + ["train.max_iters=2"])
    assert result.global_step == 2
    assert OmegaConf.load(output / "config.yaml").train.max_iters == 2


def test_a_checkpoint_that_records_its_world_size_is_compared_by_global_batch(tmp_path, monkeypatch):
    import torch

    from dino.config import to_yaml
    from dino.config_validation import check_resume_against_output_dir

    saved = _cfg(f"train.output_dir={tmp_path}", "train.batch_size_per_device=32")
    torch.save({"config": to_yaml(saved), "world_size": 2}, tmp_path / "checkpoint.pth")
    now = _cfg(f"train.output_dir={tmp_path}", "train.batch_size_per_device=64")
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_resume_against_output_dir(now)  # 2 × 32 == 1 × 64
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"global batch 64 \(2 × 32\) → 128 \(2 × 64\)"):
        check_resume_against_output_dir(now)
