"""Deterministic data order and augmentation: functions of (seed, epoch, index) alone.

The trainer and the stage-1 feature cache both take their per-item seeding from here, so a
cached view v of image i is exactly what epoch v of an uncached run sees, and a run resumed
mid-epoch sees the same batches as one never interrupted (also split over DDP ranks).
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item `index`'s augmentation in `epoch`."""
    return (seed * 1_000_003 + epoch * 100_003 + int(index)) % (2**63)


class SeededDataset(Dataset):
    """Each item's augmentation draws from an RNG seeded by (seed, epoch, index).

    An index may come as an `(epoch, index)` pair (`EpochTagged`): persistent DataLoader
    workers keep their own copy of this dataset, in which `epoch` never moves."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        # One thread for the per-image transforms: on tiny tensors torch's intra-op threads
        # cost more than they give, up to 30x on a busy machine (benchmarks/loader.py).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, epoch, index))
                return self.dataset[index]
        finally:
            torch.set_num_threads(threads)


class EpochBatchSampler(Sampler):
    """Global batches from a permutation seeded by (seed, epoch); rank r of W takes its
    slice of each global batch, so W processes together see what one process sees.
    `skip` leaves out the first batches of the epoch (resuming mid-epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world, self.epoch, self.skip = rank, world, 0, 0

    def _batches(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for start in range(0, self.n, self.batch_size):
            batch = order[start:start + self.batch_size]
            share = math.ceil(len(batch) / self.world)
            # A rank with nothing of a last batch smaller than the world must still join
            # the gradient all-reduce (or DDP hangs): it takes one sample, weighted 0.
            yield batch[self.rank * share:(self.rank + 1) * share] or batch[:1]

    def __iter__(self):
        for i, batch in enumerate(self._batches()):
            if i >= self.skip and batch:
                yield batch

    def own(self, i: int) -> int:
        """How many samples of global batch i are this rank's (0 for a padding sample)."""
        size = min(self.batch_size, self.n - i * self.batch_size)
        share = math.ceil(size / self.world)
        return max(0, min(share, size - self.rank * share))

    def loss_scale(self, i: int) -> float:
        """Factor on this rank's mean loss of batch i such that DDP's gradient average is
        the gradient of the global batch's mean loss, also when the slices are uneven."""
        size = min(self.batch_size, self.n - i * self.batch_size)
        return self.own(i) * self.world / size

    def __len__(self):
        return math.ceil(self.n / self.batch_size)


class EpochTagged(Sampler):
    """An EpochBatchSampler's batches as `(epoch, index)` pairs, for a DataLoader whose
    worker processes persist across epochs (SeededDataset reads the epoch from the pair)."""

    def __init__(self, sampler: EpochBatchSampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(epoch, i) for i in batch]

    def __len__(self):
        return len(self.sampler)
