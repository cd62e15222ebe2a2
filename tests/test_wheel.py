"""The package as users get it: build a wheel, install it into a fresh virtual environment outside the
checkout, and run the installed `dino` command there (a preset's --help, one training step, the exported
backbone read back).  This is what catches presets or modules that only an editable checkout can find.

The fresh environment reuses this interpreter's installed dependencies (a .pth line pointing at our
site-packages) and installs the wheel with --no-deps, so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from PIL import Image

from helpers import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # ~40 s on 2 cores; CI runs it


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return done


def copy_sources(destination: Path) -> Path:
    """What a wheel is built from (sdist-like: no build outputs, caches or virtual environments)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    destination.mkdir()
    shutil.copytree(ROOT / "dino", destination / "dino", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, destination / name)
    return destination


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of a fresh venv holding only the built wheel, clean environment variables, work folder)."""
    pytest.importorskip("setuptools")  # the dev extra installs it; the build runs without isolation (no download)
    work = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_NO_INPUT"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    source = copy_sources(work / "src")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(work / "dist"),
            str(source),
        ],
        cwd=work,
        env=env,
    )
    wheels = list((work / "dist").glob("dino-*.whl"))
    assert len(wheels) == 1, wheels

    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=work, env=env)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work, env=env)
    # our dependencies (torch, hydra, ...) without downloading them again; the editable install of the
    # checkout stays invisible, as .pth files in a folder added this way are not executed
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site.stdout.strip(), "_outer_site_packages.pth").write_text("\n".join(sorted(ours)) + "\n")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheels[0]),
        ],
        cwd=work,
        env=env,
    )
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return bin_dir, env, work


def test_wheel_ships_presets_and_modules(installed):
    bin_dir, env, work = installed
    code = (
        "import dino, dino.jobs.eval_knn, dino.config as c; print(dino.__file__); "
        "print(c.package_config_dir()); print(','.join(c.list_presets('train')))"
    )
    out = run([str(bin_dir / "python"), "-c", code], cwd=work, env=env).stdout.splitlines()
    assert str(work / "venv") in out[0] and str(ROOT) not in out[0]  # the installed copy, not the checkout
    assert Path(out[1], "train", "dinov2_vits14.yaml").is_file() and Path(out[1], "inference", "extract.yaml").is_file()
    assert "dinov2_vits14" in out[2].split(",") and "demo" in out[2].split(",")


def test_installed_dino_command_help_and_one_training_step(installed, tmp_path):
    bin_dir, env, work = installed
    dino = str(bin_dir / "dino")
    help_text = run([dino, "train", "--config", "dinov2_vits14", "--help"], cwd=tmp_path, env=env).stdout
    assert "usage: dino train" in help_text and "dinov2_vits14" in help_text and "--batch_size_per_gpu" in help_text
    assert "--pretrained_weights" in run([dino, "eval-knn", "--help"], cwd=tmp_path, env=env).stdout

    data = tmp_path / "images"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * i, 200 if label == "a" else 20, 90)).save(data / label / f"{i}.png")
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(data, out, 4, "optim.epochs=1") if not o.startswith("train.device=")]
    run([dino, "train", "--device", "cpu", "--max_iters", "1", *overrides], cwd=tmp_path, env=env, timeout=600)
    assert (out / "checkpoint.pth").is_file() and (out / "teacher_backbone.safetensors").is_file()
    check = (
        "from dino.hub import load_backbone; m = load_backbone('teacher_backbone.safetensors'); "
        "print(m.embed_dim, len(m.blocks), m.patch_size)"
    )
    assert run([str(bin_dir / "python"), "-c", check], cwd=out, env=env).stdout.split() == ["48", "2", "8"]
