"""Sharded epoch sampler and the seeded DataLoader: disjoint shards, per-epoch determinism, exact resume."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from torch.utils.data import Dataset

import dino.data
from dino.data import (
    DataAugmentationDINO,
    MaskingGenerator,
    ShardedEpochSampler,
    build_dataset,
    collate_data_and_cast,
    make_data_loader,
    make_demo_image,
)
from dino.errors import UserError

# ------------------------------------------------------------------------------------------ sampler


@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_are_disjoint_and_cover_the_dataset(drop_last):
    size, world = 10, 3
    shards = [
        list(ShardedEpochSampler(size, seed=1, rank=r, world_size=world, drop_last=drop_last)) for r in range(world)
    ]
    per_rank = 3 if drop_last else 4
    assert all(len(s) == per_rank for s in shards)
    flat = [i for s in shards for i in s]
    if drop_last:
        assert len(set(flat)) == 9  # disjoint, one sample of the tail dropped
    else:
        assert set(flat) == set(range(size)) and len(flat) == 12  # padded by repeating the start
    assert all(0 <= i < size for i in flat)


def test_order_is_deterministic_per_epoch():
    def order(epoch, seed=0):
        sampler = ShardedEpochSampler(50, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert order(3) != order(3, seed=1)
    assert sorted(order(3)) == list(range(50))
    assert list(ShardedEpochSampler(7, shuffle=False)) == list(range(7))
    assert list(ShardedEpochSampler(7, shuffle=False, rank=1, world_size=2)) == [1, 3, 5]


def test_resume_mid_epoch_continues_the_same_order():
    uninterrupted = ShardedEpochSampler(40, seed=5, rank=1, world_size=2)
    uninterrupted.set_epoch(2)
    full = list(uninterrupted)

    resumed = ShardedEpochSampler(40, seed=5, rank=1, world_size=2)
    resumed.set_epoch(2)
    resumed.set_start_index(8)
    assert list(resumed) == full[8:] and len(resumed) == 12

    resumed.set_epoch(2)  # the training loop re-announcing the same epoch keeps the resume point
    assert len(resumed) == 12
    resumed.set_epoch(3)  # the next epoch starts from the beginning
    assert len(resumed) == 20 and resumed.start_index == 0
    with pytest.raises(ValueError):
        resumed.set_start_index(21)


def test_sampler_rejects_impossible_settings():
    with pytest.raises(UserError):
        ShardedEpochSampler(2, world_size=4, rank=0)
    with pytest.raises(ValueError):
        ShardedEpochSampler(10, rank=2, world_size=2)


# ------------------------------------------------------------------------------------ seeded loading


class RandomAugmentedDataset(Dataset):
    """Sample i is (i, a random number): stands in for a dataset with random augmentations."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return torch.tensor([float(index), torch.rand(()).item()])


def random_collate(items):
    batch = torch.stack(items)
    return batch, torch.rand(1)  # randomness inside collate, like mask sampling


def load_epoch(num_workers, epoch, start_index=0, size=24, batch_size=4):
    sampler = ShardedEpochSampler(size, seed=3)
    sampler.set_epoch(epoch)
    sampler.set_start_index(start_index)
    loader = make_data_loader(
        RandomAugmentedDataset(size), batch_size, num_workers, sampler, collate_fn=random_collate, seed=11
    )
    return [(batch.clone(), extra.clone()) for batch, extra in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (batch_a, extra_a), (batch_b, extra_b) in zip(a, b):
        assert torch.equal(batch_a, batch_b) and torch.equal(extra_a, extra_b)


def test_resumed_loader_reproduces_augmentations_exactly():
    full = load_epoch(num_workers=0, epoch=1)
    assert len(full) == 6
    resumed = load_epoch(num_workers=0, epoch=1, start_index=2 * 4)
    assert_same_batches(resumed, full[2:])
    # Different epochs give different augmentations of the same images.
    other = load_epoch(num_workers=0, epoch=2)
    assert not torch.equal(
        torch.cat([b for b, _ in other])[:, 1].sort().values, torch.cat([b for b, _ in full])[:, 1].sort().values
    )


def test_worker_count_does_not_change_the_batches():
    assert_same_batches(load_epoch(num_workers=2, epoch=0, start_index=4), load_epoch(num_workers=0, epoch=0)[1:])


def test_loading_does_not_disturb_the_callers_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_epoch(num_workers=0, epoch=0)
    assert torch.equal(torch.rand(3), expected)


def test_loader_refuses_an_epoch_without_a_batch():
    with pytest.raises(UserError, match="batch size"):
        make_data_loader(RandomAugmentedDataset(3), batch_size=4, num_workers=0, sampler=ShardedEpochSampler(3))
    # Resuming at the very end of an epoch is fine even though less than a batch is left.
    sampler = ShardedEpochSampler(10)
    sampler.set_start_index(8)
    assert len(make_data_loader(RandomAugmentedDataset(10), 4, 0, sampler)) == 0


def test_plain_sampler_gets_seeded_workers():
    def first_values():
        loader = make_data_loader(RandomAugmentedDataset(8), 4, num_workers=1, sampler=None, seed=5)
        return torch.cat(list(loader))

    assert torch.equal(first_values(), first_values())


def test_full_pipeline_resumes_exactly(tmp_path):
    """Images → multi-crop → masks → batches: a resumed epoch repeats the uninterrupted one bit for bit."""
    for i in range(8):
        os.makedirs(tmp_path / "imgs", exist_ok=True)
        make_demo_image(i % 8, seed=i, image_size=32).save(tmp_path / "imgs" / f"{i}.png")
    dataset = build_dataset(
        tmp_path / "imgs",
        transform=DataAugmentationDINO(global_crops_size=16, local_crops_size=8, local_crops_number=2),
    )
    collate = functools.partial(collate_data_and_cast, mask_generator=MaskingGenerator(4, max_num_patches=8))

    def run(start_index):
        sampler = ShardedEpochSampler(len(dataset), seed=0)
        sampler.set_epoch(1)
        sampler.set_start_index(start_index)
        return list(make_data_loader(dataset, 2, 0, sampler, collate_fn=collate, seed=0))

    full, resumed = run(0), run(4)
    assert len(full) == 4 and len(resumed) == 2
    for a, b in zip(full[2:], resumed):
        for key in ("collated_global_crops", "collated_local_crops", "collated_masks", "masks_weight", "labels"):
            assert torch.equal(a[key], b[key]), key
    assert a["collated_global_crops"].shape == (4, 3, 16, 16) and a["collated_local_crops"].shape == (4, 3, 8, 8)


def test_public_api_is_exported():
    for name in dino.data.__all__:
        assert hasattr(dino.data, name), name
