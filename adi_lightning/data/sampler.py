"""GlobalBatchSampler: the same triples in the same optimizer step, whatever the rank count.

Lightning's default ``DistributedSampler`` interleaves a permutation over ranks, so a run on
2 ranks with batch b and a run on 1 rank with batch 2b see different global batches. Here each
epoch's permutation (keyed by seed and epoch) is cut into global batches of ``batch_size x
world_size`` items, and rank r takes its contiguous slice of each: the global batch is the same
for every rank count. Lightning cannot resume a plain loader mid-epoch, so the sampler can also
start at a given batch of the epoch (set from the restored loop progress) and skip what the
interrupted run already consumed. Items of a padded last global batch appear twice in it (with
the same noise, since randomness is keyed by item and step): a negligible over-weighting.

It subclasses ``DistributedSampler`` only so that Lightning leaves it in place (and calls
``set_epoch``) instead of wrapping it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler

from .triples import triple_key


class GlobalBatchSampler(DistributedSampler):
    """Seeded shuffle aligned to global batches, padded by wrapping (never dropped)."""

    def __init__(self, num_items: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if num_items < 1:
            raise ValueError("the training set is empty")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        # No super().__init__: it would query torch.distributed; set what Lightning reads.
        self.num_items = num_items
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.shuffle = True
        self.drop_last = False
        self.start_batch = 0
        global_batch = batch_size * num_replicas
        self.num_batches = math.ceil(num_items / global_batch)
        self.num_samples = self.num_batches * batch_size
        self.total_size = self.num_batches * global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> torch.Tensor:
        """``[num_batches, batch_size * num_replicas]`` item indices of this epoch."""
        generator = torch.Generator().manual_seed(triple_key(self.seed, self.epoch))
        order = torch.randperm(self.num_items, generator=generator)
        if self.total_size > self.num_items:  # pad by wrapping around, as DistributedSampler does
            order = order.repeat(math.ceil(self.total_size / self.num_items))[: self.total_size]
        return order.reshape(self.num_batches, -1)

    def __iter__(self) -> Iterator[int]:
        start, self.start_batch = self.start_batch, 0  # a resume offset applies to one pass only
        lo = self.rank * self.batch_size
        mine = self.global_batches()[start:, lo : lo + self.batch_size]
        # Item i of epoch e is emitted as e * num_items + i: the dataset keys an item's flip,
        # template and partner choice on it, so they change from epoch to epoch.
        return iter((mine.flatten() + self.epoch * self.num_items).tolist())

    def __len__(self) -> int:
        # The full epoch length even when resuming: Lightning counts the consumed batches itself.
        return self.num_samples
