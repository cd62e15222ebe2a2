"""Packaging and ecosystem formats: presets found through importlib.resources (and a user's folder), one `dino`
subcommand per job, the `dino` logger, and backbones written / read as safetensors and Hugging Face folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from dino import hub
from dino.cli import JOBS, dispatch, main
from dino.config import compose, list_presets, package_config_dir
from dino.errors import UserError
from dino.models import build_backbone

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(embed_dim=64, num_heads=4, depth=2)


def tiny(num_register_tokens: int = 0, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = build_backbone("vit_tiny", 16, num_register_tokens=num_register_tokens, **TINY, **kwargs).eval()
    with torch.no_grad():  # random tokens and LayerScale, so a wrong mapping cannot pass by symmetry
        for name, param in model.named_parameters():
            if "token" in name or "pos_embed" in name or name.endswith("gamma"):
                param.normal_(0, 0.5)
    return model


def features(model, x):
    with torch.no_grad():
        out = model.forward_features(x)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


# --- presets -------------------------------------------------------------------------------------
def test_presets_live_in_the_package():
    folder = package_config_dir()
    assert folder == ROOT / "dino" / "configs" and not (ROOT / "configs").exists()
    assert {"demo", "dino_vits16", "dinov2_vits14", "dinov2_vitg14"} <= set(list_presets("train"))
    assert "knn" in list_presets("eval") and "extract" in list_presets("inference")


def test_user_config_folder_is_searched_first_and_can_build_on_package_bases(tmp_path, monkeypatch):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "mine.yaml").write_text("defaults:\n  - _base\n  - _self_\noptim:\n  epochs: 3\n")
    monkeypatch.setenv("DINO_CONFIG_DIR", str(tmp_path))
    assert "mine" in list_presets("train") and "demo" in list_presets("train")
    cfg = compose("train/mine", ["optim.lr=0.25"])
    assert cfg.optim.epochs == 3 and cfg.optim.lr == 0.25
    assert cfg.model.arch == compose("train/_base").model.arch  # the package's shared base filled in the rest
    assert compose("train/demo").optim.epochs != 3  # package presets still found
    monkeypatch.setenv("DINO_CONFIG_DIR", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="DINO_CONFIG_DIR"):
        list_presets("train")


# --- console commands ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", sorted(JOBS))
def test_every_job_has_a_subcommand_with_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dispatch([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    if command == "slurm":  # the launcher's own parser; its flags come before `--` and the training flags
        assert out.startswith("usage: ") and "--gpus_per_node" in out
    else:
        assert out.startswith(f"usage: dino {command} ") and "--config" in out


def test_subcommand_and_script_share_flags(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("visualize_pca_script", ROOT / "visualize_pca.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from dino.jobs import visualize_pca

    assert script.main is visualize_pca.main and script.CLI is visualize_pca.CLI


def test_top_level_usage_lists_every_job(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in list(JOBS) + ["extract", "search", "duplicates", "export"]:
        assert f"  {command} " in out
    with pytest.raises(SystemExit) as exit_info:
        main(["eval-knnn"])
    assert exit_info.value.code == 2
    assert "Did you mean: eval-knn" in capsys.readouterr().err


# --- logging -------------------------------------------------------------------------------------
def test_library_logs_to_the_dino_logger_and_the_cli_prints_it(tmp_path, capsys, caplog):
    weights = tmp_path / "tiny.safetensors"
    hub.save_backbone(tiny(), weights, dict(arch="vit_tiny", patch_size=16, **TINY))
    argv = [
        "visualize-attention",
        "--pretrained_weights",
        str(weights),
        "--image_size",
        "32",
        "--output_dir",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    logger = logging.getLogger("dino")
    saved = list(logger.handlers), logger.level
    try:
        logger.handlers = [h for h in logger.handlers if isinstance(h, logging.NullHandler)]
        with caplog.at_level(logging.INFO, logger="dino"):
            written = dispatch(argv)  # as a library call: records, no console output
        assert any(r.name.startswith("dino") and "wrote" in r.getMessage() for r in caplog.records)
        assert "wrote" not in capsys.readouterr().out
        main(argv)  # the console command: the same lines on stdout
        out = capsys.readouterr().out
        assert all(f"wrote {path}" in out for path in written)
    finally:
        logger.handlers, _ = saved
        logger.setLevel(saved[1])


# --- safetensors ---------------------------------------------------------------------------------
def test_safetensors_backbone_carries_its_architecture(tmp_path):
    model = tiny(num_register_tokens=2, interpolate_offset=0.0, interpolate_antialias=True, init_values=1e-5)
    kwargs = dict(
        arch="vit_tiny",
        patch_size=16,
        num_register_tokens=2,
        interpolate_offset=0.0,
        interpolate_antialias=True,
        **TINY,
    )
    path = tmp_path / "teacher_backbone.safetensors"
    hub.save_backbone(model, path, kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher_backbone.safetensors"]  # no sidecar

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()[hub.SAFETENSORS_KWARGS_KEY]) == kwargs
        assert "blocks.0.attn.qkv.weight" in handle.keys()
    loaded = hub.load_backbone(str(path))
    assert loaded.interpolate_offset == 0.0 and loaded.interpolate_antialias and loaded.num_register_tokens == 2
    x = torch.randn(2, 3, 48, 80)  # not the stored grid: interpolation settings matter
    for ours, theirs in zip(features(loaded, x), features(model, x)):
        torch.testing.assert_close(ours, theirs)


def test_pth_export_gets_a_safetensors_twin_that_loads_the_same(tmp_path):
    model = tiny()
    hub.save_backbone(
        model, tmp_path / "teacher_backbone.pth", dict(arch="vit_tiny", patch_size=16, **TINY), safetensors_copy=True
    )  # what the training loop writes
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["teacher_backbone.json", "teacher_backbone.pth", "teacher_backbone.safetensors"]
    x = torch.randn(1, 3, 64, 64)
    a = features(hub.load_backbone(str(tmp_path / "teacher_backbone.pth")), x)
    b = features(hub.load_backbone(str(tmp_path / "teacher_backbone.safetensors")), x)
    torch.testing.assert_close(a, b)
    hub.save_backbone(model, tmp_path / "only.pth")
    assert not (tmp_path / "only.safetensors").exists() and not (tmp_path / "only.json").exists()


def test_broken_safetensors_is_one_line_error(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a valid safetensors file") as info:
        hub.load_backbone(str(bad))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("registers", [0, 4])
def test_our_hugging_face_export_loads_back(tmp_path, registers):
    from dino.inference.export.hf import export_hf

    extra = dict(interpolate_offset=0.0, interpolate_antialias=True) if registers else {}
    model = tiny(num_register_tokens=registers, init_values=1e-5, **extra)
    folder = export_hf(model, tmp_path / "hf")
    loaded = hub.load_backbone(str(folder))  # the folder, as `from_pretrained` takes it
    assert loaded.num_register_tokens == registers
    x = torch.randn(2, 3, model.img_size, model.img_size)
    for ours, theirs in zip(features(loaded, x), features(model, x)):
        torch.testing.assert_close(ours, theirs)


def test_hugging_face_weights_file_alone_loads_when_the_width_names_a_size(tmp_path):
    from dino.inference.export.hf import export_hf

    torch.manual_seed(0)
    model = build_backbone("vit_small", 16, depth=1, img_size=64).eval()  # width 384: vit_small's
    export_hf(model, tmp_path / "hf")
    loaded = hub.load_backbone(str(tmp_path / "hf" / "model.safetensors"))  # no config.json next to it
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(features(loaded, x)[0], features(model, x)[0])


def test_hugging_face_names_under_a_prefix_and_missing_parts():
    from dino.inference.export.hf import hf_state_dict

    model = tiny()
    prefixed = {f"dinov2.{k}": v for k, v in hf_state_dict(model).items()}
    prefixed["classifier.weight"] = torch.zeros(10, 128)
    state = hub.extract_backbone_state_dict(prefixed)
    assert set(state) >= set(model.state_dict())
    torch.testing.assert_close(state["blocks.1.attn.qkv.weight"], model.state_dict()["blocks.1.attn.qkv.weight"])
    del prefixed["dinov2.encoder.layer.1.attention.attention.key.weight"]
    with pytest.raises(UserError, match="block 1 lacks"):
        hub.extract_backbone_state_dict(prefixed)


def test_an_empty_folder_is_neither_checkpoint_kind(tmp_path):
    with pytest.raises(UserError, match="not a sharded .* and not a Hugging Face model folder"):
        hub.load_backbone(str(tmp_path))


def test_logger_is_quiet_without_the_cli():
    """Importing the package installs no console handler: the library prints nothing on its own."""
    import subprocess
    import sys

    code = (
        "import logging, dino.hub, dino.cli; logging.getLogger('dino.hub').info('hello'); "
        "print([type(h).__name__ for h in logging.getLogger('dino').handlers])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "['NullHandler']" and "hello" not in out.stderr
