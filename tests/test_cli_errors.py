"""User errors at the command line: one clear line on stderr, exit status 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from dino.hub import save_backbone
from dino.models import build_backbone

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "backbone.pth"
    save_backbone(build_backbone("vit_small", 16, depth=1), path)
    return path


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_image(tmp_path, tiny_checkpoint):
    result = run(
        "visualize_attention.py",
        "--image_path",
        str(tmp_path / "nope.jpg"),
        "--pretrained_weights",
        str(tiny_checkpoint),
        "--output_dir",
        str(tmp_path),
    )
    assert_clean_error(result, "nope.jpg")


def test_corrupt_image(tmp_path, tiny_checkpoint):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    result = run(
        "visualize_attention.py",
        "--image_path",
        str(bad),
        "--pretrained_weights",
        str(tiny_checkpoint),
        "--output_dir",
        str(tmp_path),
    )
    assert_clean_error(result, "bad.jpg")


def test_wrong_arch_for_checkpoint(tmp_path, tiny_checkpoint):
    result = run("eval_knn.py", "--pretrained_weights", str(tiny_checkpoint), "--arch", "vit_base")  # demo data
    assert_clean_error(result, "vit_small")


def test_unknown_arch_in_training():
    result = run("main_dino.py", "--arch", "vit_smal", "--epochs", "1")
    assert_clean_error(result, "vit_small")


def test_missing_checkpoint_and_bad_key(tmp_path):
    assert_clean_error(run("eval_knn.py", "--pretrained_weights", str(tmp_path / "missing.pth")), "missing.pth")
    assert_clean_error(run("main_dino.py", "optim.lrr=1"), "optim.lr")
