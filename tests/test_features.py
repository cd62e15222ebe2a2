"""Feature extraction: dataset order, sharding across ranks (a real 2-process run), dumps, multi-block features.

Also holds the tiny fixtures (image folders, a saved depth-2 ViT) that test_eval_knn.py and
test_eval_linear.py import.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino.distributed import DeviceContext
from dino.errors import UserError
from dino.eval import features as F
from dino.hub import save_backbone
from dino.models import build_backbone

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_VIT = dict(arch="vit_tiny", patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2)


# ------------------------------------------------------------------------------------------ fixtures


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    kwargs = dict(TINY_VIT)
    return build_backbone(kwargs.pop("arch"), kwargs.pop("patch_size"), **kwargs).eval()


def save_tiny_vit(path: Path, seed: int = 0) -> Path:
    save_backbone(tiny_vit(seed), path, model_kwargs=dict(TINY_VIT))
    return path


def write_image_folder(root: Path, classes: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """root/<class>/<i>.png; class c is a solid colour (hue depends on c) plus noise, so classes are separable."""
    rng = np.random.default_rng(seed)
    for class_index, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.zeros(3)
        base[class_index % 3] = 200 if class_index < 3 else 120
        for i in range(count):
            pixels = np.clip(base + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="RGB").save(folder / f"{i:03d}.png")
    return root


def write_train_val(root: Path, num_classes: int = 3, train_per_class: int = 6, val_per_class: int = 3) -> Path:
    names = [f"class_{c}" for c in range(num_classes)]
    write_image_folder(root / "train", {n: train_per_class for n in names}, seed=1)
    write_image_folder(root / "val", {n: val_per_class for n in names}, seed=2)
    return root


class IndexedImages(torch.utils.data.Dataset):
    """Deterministic random 'images'; label = index, so the order of extracted rows is visible."""

    def __init__(self, count: int, size: int = 32):
        generator = torch.Generator().manual_seed(123)
        self.images = torch.randn(count, 3, size, size, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], index


CPU = DeviceContext(type="cpu")


# ------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("num_samples,world_size", [(10, 2), (11, 2), (7, 3), (2, 4), (1, 1)])
def test_shards_cover_every_index_with_equal_lengths(num_samples, world_size):
    shards = [F.shard_indices(num_samples, r, world_size) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    assert sorted(set(i for s in shards for i in s)) == list(range(num_samples))
    unpadded = [F.shard_indices(num_samples, r, world_size, pad=False) for r in range(world_size)]
    assert sorted(i for s in unpadded for i in s) == list(range(num_samples))


def test_features_are_in_dataset_order_and_match_per_image_forward():
    model, dataset = tiny_vit(), IndexedImages(9)
    features, labels = F.extract_features(model, dataset, CPU, batch_size=4, num_workers=0)
    assert features.dtype == torch.float32 and features.shape == (9, 32)
    assert labels.tolist() == list(range(9))
    with torch.no_grad():
        expected = torch.stack([model(dataset.images[i : i + 1])[0] for i in range(9)])
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_shards_reassembled_from_simulated_ranks_equal_single_process():
    model, dataset = tiny_vit(), IndexedImages(11)
    single, single_labels = F.extract_features(model, dataset, CPU, batch_size=4, num_workers=0)
    # what each rank extracts before the gather: its strided shard, in shard order
    parts = [
        (F.shard_indices(11, r, 3),)
        + F._extract_local(
            model,
            dataset,
            F.shard_indices(11, r, 3),
            CPU,
            batch_size=2,
            num_workers=0,
            feature_fn=None,
            desc="features",
            progress=False,
            skip_unreadable=False,
        )[:2]
        for r in range(3)
    ]
    # all_gather concatenates in rank order
    indices = torch.cat([torch.tensor(p[0]) for p in parts])
    feats = torch.cat([p[1] for p in parts])
    labels = torch.cat([p[2] for p in parts])
    merged, merged_labels = F.assemble_in_dataset_order(feats, labels, indices, 11)
    torch.testing.assert_close(merged, single, rtol=1e-4, atol=1e-5)
    assert merged_labels.tolist() == single_labels.tolist() == list(range(11))


_TWO_RANK_WORKER = """
import sys, torch
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from dino.distributed import DeviceContext, init_distributed, get_world_size
from dino.eval.features import extract_features
from test_features import IndexedImages, tiny_vit
init_distributed("gloo")
assert get_world_size() == 2
features, labels = extract_features(tiny_vit(), IndexedImages(11), DeviceContext(type="cpu"), batch_size=3, num_workers=0)
torch.save((features, labels), {out!r} + "." + __import__("os").environ["RANK"])
# a process group left open when the interpreter exits can abort in gloo's threads ("terminate called ...")
torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_give_the_single_process_features(tmp_path):
    out = str(tmp_path / "features")
    code = _TWO_RANK_WORKER.format(repo=str(REPO_ROOT), tests=str(REPO_ROOT / "tests"), out=out)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    single, single_labels = F.extract_features(tiny_vit(), IndexedImages(11), CPU, batch_size=4, num_workers=0)
    for rank in range(2):
        features, labels = torch.load(f"{out}.{rank}")
        assert labels.tolist() == list(range(11))
        torch.testing.assert_close(features, single, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_gives_float32_features_close_to_fp32():
    model, dataset = tiny_vit(), IndexedImages(4)
    fp32, _ = F.extract_features(model, dataset, CPU, batch_size=4, num_workers=0)
    bf16, _ = F.extract_features(
        model, dataset, DeviceContext(type="cpu", precision="bf16"), batch_size=4, num_workers=0
    )
    assert bf16.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(bf16, fp32).min() > 0.98


# ------------------------------------------------------------------------------------ multi-block feature


def test_multiblock_feature_concatenates_last_cls_tokens_and_pooled_patches():
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = F.get_block_tokens(model, images, 2)
        one = F.multiblock_feature(tokens, 1, False)
        two_pooled = F.multiblock_feature(tokens, 2, True)
        # the last block's normed CLS is the model output
        torch.testing.assert_close(one, model(images))
    assert two_pooled.shape == (2, F.multiblock_feature_dim(32, 2, True)) == (2, 96)
    torch.testing.assert_close(two_pooled[:, :32], tokens[0][1])
    torch.testing.assert_close(two_pooled[:, 32:64], tokens[1][1])
    torch.testing.assert_close(two_pooled[:, 64:], tokens[1][0].mean(dim=1))
    with pytest.raises(ValueError):
        F.multiblock_feature(tokens, 3, False)


# ------------------------------------------------------------------------------------------ dump / load


def test_dump_and_load_features_roundtrip(tmp_path):
    tensors = (torch.randn(5, 4), torch.arange(5), torch.randn(3, 4), torch.tensor([0, 2, 1]))
    F.dump_features(tmp_path / "dump", *tensors, meta={"classes": ["a", "b", "c"]})
    assert sorted(os.listdir(tmp_path / "dump")) == sorted(list(F.FEATURE_FILES.values()) + [F.FEATURE_META_FILE])
    for loaded, original in zip(F.load_features(tmp_path / "dump"), tensors):
        torch.testing.assert_close(loaded, original.to(loaded.dtype))
    assert F.load_features_meta(tmp_path / "dump") == {"classes": ["a", "b", "c"]}
    os.remove(tmp_path / "dump" / "testfeat.pth")
    with pytest.raises(UserError, match="testfeat.pth"):
        F.load_features(tmp_path / "dump")


# ------------------------------------------------------------------------------------------- set-up


def test_class_set_mismatch_names_the_classes(tmp_path):
    write_image_folder(tmp_path / "train", {"cat": 1, "dog": 1, "eel": 1})
    write_image_folder(tmp_path / "val", {"cat": 1, "dog": 1, "fox": 1})
    with pytest.raises(UserError, match=r"only in train: \['eel'\]; only in val: \['fox'\]"):
        F.build_train_val_datasets(str(tmp_path), None, None)


def test_empty_class_folder_warns(tmp_path):
    write_image_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    write_image_folder(tmp_path / "val", {"cat": 1, "dog": 1})
    (tmp_path / "val" / "dog" / "000.png").unlink()
    with pytest.warns(UserWarning, match="dog"):
        train, val = F.build_train_val_datasets(str(tmp_path), None, None)
    assert train.classes == val.classes == ["cat", "dog"]


def test_missing_split_is_a_user_error(tmp_path):
    write_image_folder(tmp_path / "train", {"cat": 1})
    with pytest.raises(UserError, match="no 'val' folder"):
        F.build_train_val_datasets(str(tmp_path), None, None)


def test_image_sizes_follow_the_protocol_or_the_demo_size():
    assert F.resolve_image_sizes(None, None) == F.EvalImageSizes(256, 224)
    assert F.resolve_image_sizes(None, None, native_size=64) == F.EvalImageSizes(73, 64)
    assert F.resolve_image_sizes(40, 32, native_size=64) == F.EvalImageSizes(40, 32)
    with pytest.raises(UserError):
        F.resolve_image_sizes(32, 40)
