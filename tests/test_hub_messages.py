"""Issue 17, messages that mislead when loading weights: each says what the file is and a remedy that works."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

import dino.hub as hub
from dino.errors import UserError
from dino.hub import load_backbone, save_backbone
from dino.models import build_backbone


def test_random_bytes_are_not_called_pickled_objects(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(os.urandom(4096).replace(b"\x80", b"\x00"))
    with pytest.raises(UserError) as err:
        load_backbone(str(path))
    message = str(err.value)
    assert "not a PyTorch checkpoint" in message
    assert "pickled" not in message and "allow_pickle" not in message
    assert "\n" not in message


def test_a_file_that_really_needs_pickle_still_says_so(tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"model": build_backbone("vit_small", 16, depth=1).state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(UserError, match="pickled Python objects .* --allow_pickle"):
        load_backbone(str(path))


@pytest.fixture(scope="module")
def vits16_file(tmp_path_factory):
    """A full-size DINO v1 ViT-S/16 layout (what `dino_vits16` expects), saved with a pickled extra entry."""
    torch.manual_seed(0)
    model = hub.dino_vits16(pretrained=False)
    folder = tmp_path_factory.mktemp("hub")
    plain = folder / "vits16.pth"
    torch.save(model.state_dict(), plain)
    pickled = folder / "vits16_with_args.pth"
    torch.save({"teacher": model.state_dict(), "args": argparse.Namespace(arch="vit_small")}, pickled)
    return plain, pickled, model


def test_hub_wrong_arch_names_the_entry_point_that_fits_and_that_one_works(vits16_file):
    plain, _, model = vits16_file
    with pytest.raises(UserError) as err:
        hub.dinov2_vits14(pretrained=False, weights=str(plain))
    message = str(err.value)
    assert "does not fit dinov2_vits14" in message and "'dino_vits16' entry point" in message
    assert "size mismatch" not in message and "--arch" not in message
    loaded = hub.dino_vits16(pretrained=False, weights=str(plain))  # the remedy the message gives
    torch.testing.assert_close(loaded.state_dict()["cls_token"], model.state_dict()["cls_token"])


def test_hub_allow_pickle_is_accepted(vits16_file):
    _, pickled, model = vits16_file
    with pytest.raises(UserError, match="allow_pickle=True"):
        hub.dino_vits16(pretrained=False, weights=str(pickled))
    loaded = hub.dino_vits16(pretrained=False, weights=str(pickled), allow_pickle=True)  # was a TypeError
    torch.testing.assert_close(loaded.state_dict()["pos_embed"], model.state_dict()["pos_embed"])


def _demo_backbone():
    # the demo preset's backbone: width 96 matches no named arch
    return build_backbone("vit_tiny", 8, depth=4, embed_dim=96, img_size=64)


def test_custom_size_backbone_without_its_json_does_not_suggest_arch_none(tmp_path):
    path = tmp_path / "teacher_backbone.pth"
    save_backbone(_demo_backbone(), path)  # no kwargs: no .json beside it
    with pytest.raises(UserError) as err:
        load_backbone(str(path))
    message = str(err.value)
    assert "None" not in message
    assert ".json" in message and "embed_dim 96" in message
    # with its sidecar it loads
    save_backbone(_demo_backbone(), path, dict(arch="vit_tiny", patch_size=8, depth=4, embed_dim=96, img_size=64))
    assert load_backbone(str(path)).embed_dim == 96


def test_sidecar_with_an_unknown_key_is_one_line(tmp_path):
    path = tmp_path / "teacher_backbone.pth"
    save_backbone(_demo_backbone(), path, dict(arch="vit_tiny", patch_size=8, depth=4, embed_dim=96, img_size=64))
    sidecar = tmp_path / "teacher_backbone.json"
    settings = json.loads(sidecar.read_text())
    settings["model"]["embed_dimm"] = 96
    sidecar.write_text(json.dumps(settings))
    with pytest.raises(UserError) as err:
        load_backbone(str(path))
    assert "'embed_dimm'" in str(err.value) and "embed_dim" in str(err.value)
    assert "\n" not in str(err.value)
