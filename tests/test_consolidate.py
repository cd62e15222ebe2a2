"""A sharded (FSDP / DCP) checkpoint is read back in one process: by the loader and by the consolidate tool."""

import pytest
import torch

from dino.config import compose
from dino.errors import UserError
from dino.hub import load_backbone
from dino.train.consolidate import main as consolidate_main
from dino.train.loop import train
from tests.helpers import tiny_overrides, write_image_folder


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = write_image_folder(root / "data" / "train")
    train(
        compose(
            "train/demo",
            tiny_overrides(
                data, root / "out", 8, "optim.epochs=1", "train.parallel=fsdp", "model.num_register_tokens=2"
            ),
        )
    )
    return root / "out"


def test_loader_reads_the_sharded_folder_like_the_export(fsdp_run):
    exported = load_backbone(str(fsdp_run / "teacher_backbone.pth"))
    from_shards = load_backbone(str(fsdp_run / "checkpoint_sharded"), checkpoint_key="teacher")
    student = load_backbone(str(fsdp_run / "checkpoint_sharded"), checkpoint_key="student")
    assert from_shards.num_register_tokens == 2
    for (name, a), (_, b) in zip(exported.state_dict().items(), from_shards.state_dict().items()):
        assert torch.equal(a, b), name
    # after 3 steps the EMA teacher and the student differ
    assert not torch.equal(student.blocks[0].attn.qkv.weight, from_shards.blocks[0].attn.qkv.weight)


def test_consolidate_writes_an_official_layout_backbone(fsdp_run, tmp_path):
    out = consolidate_main(
        [str(fsdp_run / "checkpoint_sharded"), "--output", str(tmp_path / "student.pth"), "--network", "student"]
    )
    weights = torch.load(out, weights_only=True)
    assert (
        "cls_token" in weights and "register_tokens" in weights and not any(k.startswith("backbone.") for k in weights)
    )
    assert (tmp_path / "student.json").is_file()
    reloaded = load_backbone(str(out))
    direct = load_backbone(str(fsdp_run / "checkpoint_sharded"), checkpoint_key="student")
    assert torch.equal(reloaded.pos_embed, direct.pos_embed)


def test_a_plain_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a sharded"):
        load_backbone(str(tmp_path))
