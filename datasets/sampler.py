"""Batch samplers that give the same global batches on one process or many.

Every epoch, all ranks build the same list of GLOBAL batches from
``(seed, epoch)``; rank r yields the contiguous slice
``batch[r * b:(r + 1) * b]`` (``b = batch_size // world_size``) of each global
batch. So every rank takes the same number of steps, and the union of the
ranks' slices at one step is exactly the batch a single process would see.
``set_epoch(epoch, start_batch)`` reshuffles and lets a resumed run skip the
batches it has already done. No global random state is used.

With ``yield_seeds=True`` a sampler yields ``(index, sample_seed)`` pairs
instead of indices; the training dataset seeds its augmentation with
``sample_seed``, which is a function of ``(seed, epoch, global batch, slot)``
only, so augmentation does not depend on the number of ranks or workers, and
a resumed run sees the same augmented samples as an uninterrupted one.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

_ORDER_STREAM, _SEED_STREAM = 0, 1


def _check_ranks(batch_size: int, rank: int, world_size: int) -> int:
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: must be positive.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size.")
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} (the global batch) is not divisible by world_size={world_size}; "
                         "choose a batch size that splits evenly across ranks.")
    return batch_size // world_size


class _GlobalBatchSampler:
    """Shared machinery: epoch bookkeeping, rank slicing, sample seeds."""

    def __init__(self, batch_size: int, seed: int, rank: int, world_size: int, yield_seeds: bool):
        self.local_batch_size = _check_ranks(batch_size, rank, world_size)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.yield_seeds = yield_seeds
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        raise NotImplementedError

    def global_batches(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch, batch_size) dataset indices of one epoch."""
        raise NotImplementedError

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, stream])

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use the order of ``epoch``, starting at global batch ``start_batch`` (for resuming)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch={start_batch}: an epoch has {self.batches_per_epoch} batches.")
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        """Batches left in the current epoch (from ``start_batch``)."""
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list]:
        batches = self.global_batches(self.epoch)
        lo, hi = self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size
        if self.yield_seeds:
            seeds = self._rng(self.epoch, _SEED_STREAM).integers(0, 2**62, size=batches.shape)
        for b in range(self.start_batch, batches.shape[0]):
            present = batches[b, lo:hi] >= 0  # a kept partial last batch is padded with -1
            indices = batches[b, lo:hi][present].tolist()
            if self.yield_seeds:
                yield list(zip(indices, seeds[b, lo:hi][present].tolist()))
            else:
                yield indices


class RandomBatchSampler(_GlobalBatchSampler):
    """Batches of a random permutation of ``range(num_samples)``.

    An epoch is one pass over the permutation. With ``drop_last`` the last
    incomplete batch is dropped; without it, it is completed with the first
    indices of the permutation, so every batch (and every rank's slice) is full,
    or with ``keep_partial`` (IRRA's, torch DataLoader's ``drop_last=False``) it
    is yielded as it is, smaller: one process only, since the ranks could not
    split it evenly.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, yield_seeds: bool = False, keep_partial: bool = False):
        super().__init__(batch_size, seed, rank, world_size, yield_seeds)
        if num_samples <= 0:
            raise ValueError(f"num_samples={num_samples}: the dataset is empty.")
        if keep_partial and (drop_last or world_size > 1):
            raise ValueError("keep_partial keeps the last incomplete batch of one process: it needs "
                             f"drop_last=False and world_size=1 (got drop_last={drop_last}, "
                             f"world_size={world_size}).")
        if drop_last and num_samples < batch_size:
            raise ValueError(f"num_samples={num_samples} < batch_size={batch_size} with drop_last=True "
                             "gives no batches; lower the batch size.")
        self.num_samples = num_samples
        self.drop_last = drop_last
        self.keep_partial = keep_partial

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def global_batches(self, epoch: int) -> np.ndarray:
        order = self._rng(epoch, _ORDER_STREAM).permutation(self.num_samples)
        total = self.batches_per_epoch * self.batch_size
        if total > order.shape[0]:
            fill = np.full(total - order.shape[0], -1) if self.keep_partial else np.resize(order, total - order.shape[0])
            order = np.concatenate([order, fill])
        return order[:total].reshape(-1, self.batch_size)


class IdentityBatchSampler(_GlobalBatchSampler):
    """P identities x K instances per batch (P = batch_size / num_instances).

    An epoch is one pass over a random permutation of the identities, cut into
    groups of P: every identity appears once per epoch, except that the last
    group is completed with identities from the start of the permutation, so
    there are ceil(num_ids / P) batches. Each identity contributes K of its
    items, drawn without replacement, or all of its items plus random repeats
    if it has fewer than K. Batches are ordered identity by identity, and each
    rank's slice holds whole identities (batch_size / world_size must be a
    multiple of K).

    Args:
        pids: identity of every dataset item (e.g. ``[item.pid for item in dataset.train]``).
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int, rank: int = 0,
                 world_size: int = 1, yield_seeds: bool = False):
        super().__init__(batch_size, seed, rank, world_size, yield_seeds)
        if num_instances <= 0:
            raise ValueError(f"num_instances={num_instances}: must be positive.")
        if batch_size % num_instances:
            raise ValueError(f"batch_size={batch_size} is not a multiple of num_instances={num_instances} "
                             "(the identity sampler fills a batch with P identities x K instances).")
        if self.local_batch_size % num_instances:
            raise ValueError(f"batch_size={batch_size} over world_size={world_size} gives {self.local_batch_size} "
                             f"samples per rank, not a multiple of num_instances={num_instances}; each rank "
                             "must hold whole identities.")
        pids = np.asarray(pids)
        if pids.ndim != 1 or pids.shape[0] == 0:
            raise ValueError("pids: expected a non-empty list with one identity per item.")
        self.num_instances = num_instances
        self.ids_per_batch = batch_size // num_instances
        self.identities, inverse = np.unique(pids, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(self.identities)))[:-1]
        self.items_of = np.split(order, bounds)  # items of each identity, in dataset order
        if len(self.identities) < self.ids_per_batch:
            raise ValueError(f"{len(self.identities)} identities cannot fill a batch of P={self.ids_per_batch} "
                             f"distinct identities (batch_size={batch_size}, num_instances={num_instances}).")

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.identities) // self.ids_per_batch)

    def global_batches(self, epoch: int) -> np.ndarray:
        rng = self._rng(epoch, _ORDER_STREAM)
        num_ids, P, K = len(self.identities), self.ids_per_batch, self.num_instances
        order = rng.permutation(num_ids)
        padded = np.concatenate([order, order[:self.batches_per_epoch * P - num_ids]])
        batches = np.empty((self.batches_per_epoch, self.batch_size), dtype=np.int64)
        for slot, identity in enumerate(padded):
            items = self.items_of[identity]
            if len(items) >= K:
                chosen = rng.choice(items, size=K, replace=False)
            else:
                chosen = rng.permutation(np.concatenate([items, rng.choice(items, size=K - len(items))]))
            b, p = divmod(slot, P)
            batches[b, p * K:(p + 1) * K] = chosen
        return batches
