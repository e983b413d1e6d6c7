"""GlobalBatchSampler: the same triples in the same optimizer step, whatever the rank count.

Lightning's default ``DistributedSampler`` interleaves a permutation over ranks, so a run on
2 ranks with batch b and a run on 1 rank with batch 2b see different global batches. Here each
epoch's permutation (keyed by seed and epoch) is cut into global batches of ``batch_size x
world_size`` items, and rank r takes its contiguous slice of each: the global batch is the same
for every rank count. Items of a padded last global batch appear twice in it (with the same noise,
since randomness is keyed by item and step): a negligible over-weighting.

Resuming: the training stream is one sequence of global batches, epoch after epoch. Given the
number of batches training has consumed so far (``position``, read from Lightning's restored batch
progress), the sampler starts at that batch of that epoch. It does not trust Lightning's epoch
counter: when ``max_steps`` stops a run mid-epoch, Lightning marks the epoch complete and the
checkpoint records the next one, although that epoch's remaining batches were never trained on.
(So with ``trainer.limit_train_batches`` shorter than an epoch, Lightning's epochs walk through one
epoch order in sequence instead of restarting a new order each time.)

It subclasses ``DistributedSampler`` only so that Lightning leaves it in place (and calls
``set_epoch``) instead of wrapping it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from .triples import triple_key


class GlobalBatchSampler(DistributedSampler):
    """Seeded shuffle aligned to global batches, padded by wrapping (never dropped).

    Args:
        position: Returns how many batches (per rank) training has consumed since the run began,
            over all epochs; read at the start of every pass. None: start at batch 0 of the epoch
            given by ``set_epoch``.
    """

    def __init__(self, num_items: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 position: Callable[[], int] | None = None):
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
        self.position = position
        self.epoch = 0
        self.shuffle = True
        self.drop_last = False
        global_batch = batch_size * num_replicas
        self.num_batches = math.ceil(num_items / global_batch)
        self.num_samples = self.num_batches * batch_size
        self.total_size = self.num_batches * global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def locate(self, consumed: int) -> tuple[int, int]:
        """``(epoch, batch within it)`` of the next batch after ``consumed`` batches."""
        return divmod(int(consumed), self.num_batches)

    def global_batches(self) -> torch.Tensor:
        """``[num_batches, batch_size * num_replicas]`` item indices of this epoch."""
        generator = torch.Generator().manual_seed(triple_key(self.seed, self.epoch))
        order = torch.randperm(self.num_items, generator=generator)
        if self.total_size > self.num_items:  # pad by wrapping around, as DistributedSampler does
            order = order.repeat(math.ceil(self.total_size / self.num_items))[: self.total_size]
        return order.reshape(self.num_batches, -1)

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self.position is not None:
            self.epoch, start = self.locate(self.position())
        lo = self.rank * self.batch_size
        mine = self.global_batches()[start:, lo : lo + self.batch_size]
        # Item i of epoch e is emitted as e * num_items + i: the dataset keys an item's flip,
        # template and partner choice on it, so they change from epoch to epoch.
        return iter((mine.flatten() + self.epoch * self.num_items).tolist())

    def __len__(self) -> int:
        # The full epoch length even when resuming: Lightning counts the consumed batches itself.
        return self.num_samples

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands (for the checkpoint's record) and what shapes the stream."""
        consumed = int(self.position()) if self.position is not None else self.epoch * self.num_batches
        epoch, batch = self.locate(consumed)
        return {"consumed_batches": consumed, "epoch": epoch, "batch": batch, "epoch_batches": self.num_batches,
                "global_batch": self.batch_size * self.num_replicas, "items": self.num_items, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The position itself comes from the restored loop progress; this only says when the
        stream changed since the checkpoint, so the resumed run cannot continue the old one."""
        now = self.state_dict()
        changed = [k for k in ("epoch_batches", "global_batch", "items", "seed") if k in state and state[k] != now[k]]
        if changed:
            rank_zero_warn(
                "the training stream differs from the checkpoint's ("
                + ", ".join(f"{k} {state[k]} -> {now[k]}" for k in changed)
                + f"): training continues at batch {now['consumed_batches']} of the new order, which is not "
                "the interrupted run's continuation")


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning stores in checkpoints (``state_dict``), so it knows
    the loader resumes mid-epoch; the position is the sampler's."""

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
