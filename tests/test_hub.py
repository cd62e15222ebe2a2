"""Checkpoint loading: official layouts load strictly, mismatches and unsafe files give clear errors."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino import hub
from dino.errors import UserError
from dino.models import build_backbone
from tests.test_models import official_v2_state_dict

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "spec",
    [
        dict(patch=14, grid=37),
        dict(patch=14, grid=37, registers=4),
        dict(patch=16, grid=14, layerscale=False, mask_token=False),
    ],
)
def test_official_backbone_files_load_strictly(tmp_path, spec):
    sd = official_v2_state_dict(**spec)
    path = tmp_path / "official.pth"
    torch.save(sd, path)
    model = hub.load_backbone(str(path))
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    for key, value in sd.items():
        assert torch.equal(loaded[key], value), key
    assert model.num_register_tokens == spec.get("registers", 0)


def test_dino_v1_full_training_checkpoint_with_prefixes_and_heads(tmp_path):
    backbone = official_v2_state_dict(patch=16, grid=14, layerscale=False, mask_token=False)
    teacher = {f"module.backbone.{k}": v for k, v in backbone.items()}
    teacher["module.head.mlp.0.weight"] = torch.randn(8, 384)
    teacher["module.head.last_layer.weight_g"] = torch.ones(4, 1)
    student = {f"module.backbone.{k}": v + 1 for k, v in backbone.items()}
    ckpt = {"teacher": teacher, "student": student, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    t = hub.load_backbone(str(path), checkpoint_key="teacher")
    s = hub.load_backbone(str(path), checkpoint_key="student")
    assert torch.equal(t.cls_token, backbone["cls_token"])
    assert torch.equal(s.cls_token, backbone["cls_token"] + 1)


def test_chunked_block_keys_are_unchunked():
    sd = official_v2_state_dict(patch=14, grid=37)
    chunked = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 1}.{i}." + k.split(".", 2)[2]
        chunked[k] = v
    cleaned = hub.extract_backbone_state_dict({"model": chunked})
    assert set(cleaned) == set(sd)


def test_pickled_checkpoint_refused_unless_allowed(tmp_path):
    sd = official_v2_state_dict(patch=16, grid=14, layerscale=False, mask_token=False)
    path = tmp_path / "with_args.pth"
    torch.save({"teacher": sd, "args": argparse.Namespace(arch="vit_small")}, path)
    with pytest.raises(UserError, match="--allow_pickle"):
        hub.load_backbone(str(path))
    model = hub.load_backbone(str(path), allow_pickle=True)
    assert torch.equal(model.cls_token, sd["cls_token"])


def test_mismatch_names_keys_and_suggests_arch(tmp_path):
    sd = official_v2_state_dict(patch=14, grid=37, registers=4)
    path = tmp_path / "reg.pth"
    torch.save(sd, path)
    with pytest.raises(UserError, match=r"patch size 14, 4 register tokens.*--arch vit_small --patch_size 14"):
        hub.load_backbone(str(path), arch="vit_base")
    with pytest.raises(UserError, match="--patch_size 14"):
        hub.load_backbone(str(path), patch_size=16)
    broken = dict(sd)
    broken.pop("blocks.1.attn.qkv.weight")
    broken["blocks.1.attn.extra.weight"] = torch.zeros(1)
    torch.save(broken, path)
    with pytest.raises(
        UserError, match=r"missing keys: blocks\.1\.attn\.qkv\.weight.*unexpected keys: blocks\.1\.attn\.extra\.weight"
    ):
        hub.load_backbone(str(path))


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        hub.load_backbone(str(tmp_path / "nope.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        hub.load_backbone(str(corrupt))
    torch.save({"epoch": 1, "optimizer": {}}, tmp_path / "nobackbone.pth")
    with pytest.raises(UserError, match="no backbone weights"):
        hub.load_backbone(str(tmp_path / "nobackbone.pth"))


def test_save_backbone_roundtrip_keeps_model_kwargs(tmp_path):
    model = build_backbone(
        "vit_small",
        14,
        depth=2,
        num_register_tokens=4,
        interpolate_offset=0.1,
        interpolate_antialias=False,
        init_values=1e-5,
    )
    hub.save_backbone(
        model,
        tmp_path / "teacher_backbone.pth",
        {"arch": "vit_small", "patch_size": 14, "interpolate_offset": 0.1, "interpolate_antialias": False},
    )
    loaded = hub.load_backbone(str(tmp_path / "teacher_backbone.pth"))
    assert loaded.interpolate_offset == 0.1 and not loaded.interpolate_antialias
    x = torch.randn(1, 3, 56, 70)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_official_entry_points_build_without_download():
    for name in hub.OFFICIAL_MODELS:
        if "vitg" in name or "vitl" in name:
            continue  # large models: the kwargs are checked in the table test below
        model = getattr(hub, name)(pretrained=False)
        # the name says the patch size and whether there are registers: dinov2_vits14_reg → 14, 4
        patch, registers = re.fullmatch(r"dino(?:v2)?_vit[sblg](\d+)(_reg)?", name).groups()
        assert (model.patch_size, model.num_register_tokens) == (int(patch), 4 if registers else 0)
    assert hub.OFFICIAL_MODELS["dinov2_vitg14"][1]["arch"] == "vit_giant2"
    assert hub.OFFICIAL_MODELS["dinov2_vits14_reg"][1]["num_register_tokens"] == 4
    assert hub.OFFICIAL_MODELS["dinov2_vits14"][0].endswith("dinov2_vits14/dinov2_vits14_pretrain.pth")
    assert hub.OFFICIAL_MODELS["dinov2_vits14_reg"][0].endswith("dinov2_vits14/dinov2_vits14_reg4_pretrain.pth")
    assert hub.OFFICIAL_MODELS["dino_vits16"][0].endswith("dino_deitsmall16/dino_deitsmall16_pretrain.pth")


def test_entry_point_weights_argument_takes_a_local_file(tmp_path):
    sd = official_v2_state_dict(patch=16, grid=14, layerscale=False, mask_token=False)
    full = build_backbone("vit_small", 16, init_values=None, use_mask_token=False).state_dict()
    full.update(sd)  # the two test blocks; the remaining blocks keep their init
    torch.save(full, tmp_path / "v1.pth")
    model = hub.dino_vits16(weights=str(tmp_path / "v1.pth"))
    assert torch.equal(model.pos_embed, sd["pos_embed"])


def test_torch_hub_load_local():
    code = (
        "import torch; m = torch.hub.load('.', 'dinov2_vits14', source='local', pretrained=False); "
        "print(tuple(m.forward_features(torch.randn(1,3,224,224))['x_norm_patchtokens'].shape))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("(1, 256, 384)")
