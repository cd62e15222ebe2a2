"""A crafted sharded checkpoint folder must not run code on any path that reads one (issue 17, Security).

DCP's own reader unpickles `.metadata` with plain pickle and non-tensor entries with
`torch.load(weights_only=False)`: both are payload carriers. The payloads here create a marker file, which
is what the tests look for.
"""

import json
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from dino.distributed.checkpoint import UnsafeCheckpointError, load_sharded, saved_keys
from dino.errors import UserError
from dino.hub import load_backbone, load_sharded_network
from dino.models import build_backbone
from dino.train.checkpoint import load_sharded_training_checkpoint
from dino.train.consolidate import main as consolidate_main


class _CreatesFile:
    """Unpickling this opens (creates) `path`: a stand-in for any code a payload would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


_KWARGS = dict(arch="vit_tiny", patch_size=8, depth=1, embed_dim=48, img_size=32)


def _backbone():
    torch.manual_seed(0)
    kwargs = dict(_KWARGS)
    return build_backbone(kwargs.pop("arch"), kwargs.pop("patch_size"), **kwargs)


def _genuine_checkpoint(folder, extra=None):
    state = {"teacher": {f"backbone.{k}": v for k, v in _backbone().state_dict().items()}}
    state.update(extra or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    (folder / "meta.json").write_text(json.dumps({"backbone_kwargs": _KWARGS}))  # as training writes it
    return folder


@pytest.fixture
def payload_folder(tmp_path):
    """A real DCP checkpoint whose `.metadata` is replaced by a pickle that creates `marker` when loaded."""
    folder = _genuine_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_CreatesFile(marker)))
    return folder, marker


def test_genuine_sharded_folder_still_loads(tmp_path):
    folder = _genuine_checkpoint(tmp_path / "ckpt", {"progress": torch.arange(3), "lr": 0.5})
    model = load_backbone(str(folder))
    assert torch.equal(model.cls_token, _backbone().cls_token)
    assert {"progress", "lr"} <= saved_keys(folder)
    state = {"progress": torch.zeros(3, dtype=torch.int64), "lr": 0.0}
    load_sharded(state, folder)  # a non-tensor entry is read back with weights_only
    assert state["lr"] == 0.5 and state["progress"].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "reader", ["load_sharded_network", "load_backbone", "consolidate", "saved_keys", "load_sharded", "torch.hub"]
)
def test_metadata_payload_is_refused_on_every_path(payload_folder, tmp_path, reader):
    folder, marker = payload_folder
    calls = {
        "load_sharded_network": lambda: load_sharded_network(str(folder)),
        "load_backbone": lambda: load_backbone(str(folder)),
        "consolidate": lambda: consolidate_main([str(folder), "--output", str(tmp_path / "out.pth")]),
        "saved_keys": lambda: saved_keys(folder),
        "load_sharded": lambda: load_sharded({"teacher": {}}, folder),
        "torch.hub": lambda: torch.hub.load(
            str(_repo_root()), "dinov2_vits14", source="local", pretrained=False, weights=str(folder)
        ),
    }
    with pytest.raises(UserError, match="refusing the sharded checkpoint"):
        calls[reader]()
    assert not marker.exists()


def test_fsdp_resume_refuses_a_metadata_payload(payload_folder):
    from dino.train.meta_arch import SelfDistillationObjective  # noqa: F401  (the resume path's own imports)

    folder, marker = payload_folder
    student = nn.Linear(2, 2)
    teacher = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(student.parameters())
    objective = nn.Module()
    with pytest.raises(UserError, match="refusing the sharded checkpoint"):
        load_sharded_training_checkpoint(folder, student, teacher, optimizer, objective, None)
    assert not marker.exists()


def test_payload_in_a_non_tensor_entry_is_refused(tmp_path):
    """The index is genuine but an optimiser hyper-parameter entry holds a payload (weights_only refuses it)."""
    marker = tmp_path / "pwned"
    folder = _genuine_checkpoint(
        tmp_path / "ckpt", {"optimizer": {"param_groups": {"0": {"lr": _CreatesFile(marker)}}}}
    )
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="optimizer.param_groups.0.lr"):
        load_sharded({"optimizer": {"param_groups": {"0": {"lr": 0.0}}}}, folder)
    assert not marker.exists()


def test_index_pointing_outside_the_folder_is_refused(tmp_path):
    folder = _genuine_checkpoint(tmp_path / "ckpt")
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="outside"):
        load_backbone(str(folder))


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


def test_a_fifo_or_missing_shard_is_refused_not_waited_for(tmp_path):
    import os

    folder = _genuine_checkpoint(tmp_path / "ckpt")
    shard = next(folder.glob("*.distcp"))
    shard.unlink()
    with pytest.raises(UserError, match=f"incomplete: its shard file {shard.name} is missing"):
        load_backbone(str(folder))
    os.mkfifo(shard)
    with pytest.raises(UnsafeCheckpointError, match="not a regular file"):
        load_backbone(str(folder))  # would block forever inside DCP's reader
