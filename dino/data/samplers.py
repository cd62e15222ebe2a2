"""Epoch sampling shared across ranks, and a DataLoader whose augmentations are reproducible on resume.

Order: every epoch, all ranks compute the same permutation from `(seed, epoch)`; rank r takes every
`world_size`-th index starting at r.  To resume in the middle of an epoch, call `set_epoch(epoch)` and then
`set_start_index(iteration * batch_size)`: the sampler continues exactly where the interrupted run stopped.

Augmentations: seeding DataLoader workers alone is not enough for an exact resume, because each worker's RNG
stream depends on how many samples it has already processed and on which worker a batch lands.  The loader
of `make_data_loader` therefore seeds Python's `random`, NumPy and torch's CPU generator *per sample* from
`(loader seed, epoch, position of the sample in the epoch)`, and the collate function (iBOT masks) from its
batch's first sample.  Crops and masks then depend only on that position: a resumed run, or a run with a
different `num_workers`, sees the same batches as the uninterrupted one.  The generator states are saved and
restored around each use, so with `num_workers=0` data loading does not disturb the training loop's RNG.
Workers are additionally seeded at start (`worker_init_fn`, from loader seed, rank, epoch and worker id) so
that randomness outside those per-sample scopes is deterministic too.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from dino.distributed import get_rank, get_world_size
from dino.errors import UserError


def mix_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integer parts (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed `random`, NumPy's global generator and torch's CPU generator; restore their states on exit.

    Only the CPU generator is touched (not `torch.manual_seed`), so CUDA generators of the main process are
    left alone.
    """
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


class ShardedEpochSampler(Sampler[int]):
    """Deterministic per-epoch permutation, split across ranks by stride, with mid-epoch resume.

    Args:
        dataset_size: number of samples.
        shuffle: permute per epoch (from `(seed, epoch)`) or keep the natural order.
        seed: permutation seed; must be equal on all ranks.
        rank, world_size: default to the current process group (0 / 1 in a single process).
        drop_last: drop the tail so every rank gets `size // world_size` samples; otherwise pad by repeating
            the start of the permutation so every rank gets `ceil(size / world_size)`.
    """

    def __init__(
        self,
        dataset_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = True,
    ):
        self.dataset_size = int(dataset_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.world_size = get_world_size() if world_size is None else int(world_size)
        self.rank = get_rank() if rank is None else int(rank)
        self.drop_last = drop_last
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")
        if self.dataset_size < 1:
            raise UserError("cannot sample from an empty dataset")
        if drop_last and self.dataset_size < self.world_size:
            raise UserError(f"dataset of {self.dataset_size} images is smaller than the {self.world_size} ranks")
        self.epoch = 0
        self.start_index = 0

    @property
    def num_samples_per_epoch(self) -> int:
        """Samples of this rank in a whole epoch (ignoring the start index)."""
        if self.drop_last:
            return self.dataset_size // self.world_size
        return math.ceil(self.dataset_size / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; moving to a different epoch resets the start index to 0."""
        if int(epoch) != self.epoch:
            self.start_index = 0
        self.epoch = int(epoch)

    def set_start_index(self, start_index: int) -> None:
        """Skip the first `start_index` samples of this rank's shard in the current epoch (call after set_epoch)."""
        if not 0 <= start_index <= self.num_samples_per_epoch:
            raise ValueError(f"start index {start_index} outside [0, {self.num_samples_per_epoch}]")
        self.start_index = int(start_index)

    def _epoch_order(self) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng([self.seed % 2**63, self.epoch]).permutation(self.dataset_size)
        else:
            order = np.arange(self.dataset_size)
        total = self.num_samples_per_epoch * self.world_size
        if total > self.dataset_size:
            order = np.concatenate([order, order[: total - self.dataset_size]])
        return order[:total]

    def iter_with_positions(self) -> Iterator[tuple[int, int]]:
        """Yield `(dataset index, position in the epoch's global order)` for this rank from the start index."""
        shard = self._epoch_order()[self.rank :: self.world_size]
        for k in range(self.start_index, len(shard)):
            yield int(shard[k]), k * self.world_size + self.rank

    def __iter__(self) -> Iterator[int]:
        return (index for index, _ in self.iter_with_positions())

    def __len__(self) -> int:
        return self.num_samples_per_epoch - self.start_index

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.dataset_size}, rank={self.rank}/{self.world_size}, "
            f"epoch={self.epoch}, start_index={self.start_index}, shuffle={self.shuffle})"
        )


# ------------------------------------------------------------------------------------ seeded loading


class _SeedingSampler(Sampler):
    """Turns `ShardedEpochSampler` indices into `(index, sample seed)` pairs for `_SeededDataset`."""

    def __init__(self, sampler: ShardedEpochSampler, seed: int):
        self.sampler = sampler
        self.seed = seed

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((index, mix_seed(self.seed, epoch, position)) for index, position in self.sampler.iter_with_positions())

    def __len__(self) -> int:
        return len(self.sampler)


class _SeededDataset(Dataset):
    """`dataset[(index, seed)]` → `(dataset[index] computed under that seed, seed)`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        # `loader.dataset.num_skipped`, `.classes`, ... keep working through the wrapper.
        if name == "dataset":  # not set yet (e.g. while unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with seeded_rngs(seed):
            return self.dataset[index], seed


class _SeededCollate:
    """Strips the seeds added by `_SeededDataset` and runs the collate under a seed of the batch."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, batch):
        items = [item for item, _ in batch]
        with seeded_rngs(mix_seed(batch[0][1], 1)):
            return self.collate_fn(items)


def _leave_sigterm_to_the_main_process() -> None:
    """In a DataLoader worker: ignore SIGTERM while the main process lives.

    `timeout`, `kill -- -PGID` and cluster pre-emption signal the whole process group (or every process of
    the job). torch's worker handler then dies at once, and the main process fails with "DataLoader worker
    killed by signal" before it can save. Ignoring it leaves the main process in charge: it saves, then
    shuts the workers down itself. A worker whose main process is gone still exits on SIGTERM.
    """
    import signal

    parent = os.getppid()

    def handler(signum, frame):
        if os.getppid() != parent:  # orphaned: nobody will shut us down, so go
            os._exit(0)

    with contextlib.suppress(ValueError):  # not the main thread of the worker: keep torch's handler
        signal.signal(signal.SIGTERM, handler)


class _WorkerSeeder:
    """`worker_init_fn`: seeds a worker's `random`, NumPy and torch from (seed, rank, epoch, worker id).

    A picklable object rather than a closure so it also works with the 'spawn' start method; the sampler it
    holds is a copy taken when the workers start, so its `epoch` is the epoch being loaded.
    """

    def __init__(self, seed: int, rank: int, sampler: Sampler | None):
        self.seed, self.rank, self.sampler = seed, rank, sampler

    def __call__(self, worker_id: int) -> None:
        _leave_sigterm_to_the_main_process()
        worker_seed = mix_seed(self.seed, self.rank, getattr(self.sampler, "epoch", 0), worker_id)
        random.seed(worker_seed)
        np.random.seed(worker_seed)
        torch.manual_seed(worker_seed)


def make_data_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    sampler: Sampler | None = None,
    collate_fn: Callable | None = None,
    pin_memory: bool = False,
    drop_last: bool = True,
    seed: int = 0,
    persistent_workers: bool = False,
) -> DataLoader:
    """A DataLoader with reproducible augmentation (see the module docstring for how resume stays exact).

    With a `ShardedEpochSampler`, every sample (and every batch's collate) runs under a seed derived from
    `(seed, epoch, position)`, so results do not depend on `num_workers` or on where a run was resumed.  With
    any other sampler (or none: sequential order) only the workers are seeded, from `(seed, rank, epoch,
    worker id)`.  Call `sampler.set_epoch(epoch)` before iterating each epoch.

    Raises `UserError` when `drop_last` is set and this rank has fewer samples than one batch, which would
    otherwise silently give an epoch with no steps.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # A whole epoch, not `len(sampler)`: a run resumed near the end of an epoch legitimately has less left.
    n_samples = getattr(sampler, "num_samples_per_epoch", None)
    if n_samples is None:
        n_samples = len(sampler) if sampler is not None else len(dataset)
    if drop_last and n_samples < batch_size:
        raise UserError(
            f"only {n_samples} images per rank, fewer than the batch size {batch_size}; "
            "lower the batch size or add images"
        )
    collate_fn = collate_fn if collate_fn is not None else default_collate
    loader_dataset, loader_sampler = dataset, sampler
    if isinstance(sampler, ShardedEpochSampler):
        loader_dataset, loader_sampler = _SeededDataset(dataset), _SeedingSampler(sampler, seed)
        collate_fn = _SeededCollate(collate_fn)
    return DataLoader(
        loader_dataset,
        batch_size=batch_size,
        sampler=loader_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=_WorkerSeeder(seed, get_rank(), sampler),
        # Drawing the workers' base seed from our own generator leaves the global torch RNG untouched.
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=persistent_workers and num_workers > 0,
    )
