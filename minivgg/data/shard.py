"""Sharding for data-parallel training: rank r of K gets its own part of every global batch.

A ShardedLoader serves, for each global batch of a DataLoader with the same seed and batch size,
the rank's part of it; the K parts of a batch are disjoint and together are the whole batch, so
K ranks together see exactly the batches (and the order) one process would see.

Notation: N samples, B global batch, K ranks (world), r rank, b batch index, e epoch.
"""
from __future__ import annotations

import numpy as np

from .loader import DataLoader, _prefetched


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's part when n items are split into `world` consecutive near-equal parts.

    The first n % world parts get one item more (as np.array_split): sizes differ by at most one.
    """
    base, extra = divmod(int(n), int(world))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _check_rank(rank, world):
    for name, v in (("rank", rank), ("world", world)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"ShardedLoader: {name} must be an integer, got {v!r}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"ShardedLoader: need 0 <= rank < world, got rank={rank}, world={world}")


class ShardedLoader(DataLoader):
    """Rank `rank`'s part of every global batch of `batch_size` images (see DataLoader for the rest).

    The order of epoch e is DataLoader.order(e), a function of (seed, e); global batch b is
    order[b*B:(b+1)*B], and this rank serves its part shard_bounds(len(batch), rank, world) of it.
    So the shard is a function of (seed, epoch, rank, world). Augmentation of that part draws from
    default_rng((seed, e, 1, b*world + rank)): different on every rank, reproducible, and with
    world=1 the same draws as DataLoader's. A last global batch with fewer images than ranks is
    dropped on every rank (each rank needs at least one image per step).
    """

    def __init__(self, images, labels, batch_size: int, rank: int, world: int, **kwargs):
        _check_rank(rank, world)
        if isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool) and batch_size < world:
            raise ValueError(f"ShardedLoader: the global batch_size {batch_size} is smaller than the {world} "
                             "ranks; every rank needs at least one image per step")
        self.rank, self.world = int(rank), int(world)
        super().__init__(images, labels, batch_size, **kwargs)

    def __len__(self) -> int:
        n_batches = super().__len__()
        last = len(self.images) - (n_batches - 1) * self.batch_size   # images in the last global batch
        return n_batches - 1 if last < self.world else n_batches

    def global_batch(self, order: np.ndarray, b: int) -> np.ndarray:
        return order[b * self.batch_size:(b + 1) * self.batch_size]

    def local_part(self, order: np.ndarray, b: int) -> np.ndarray:
        """This rank's sample indices in global batch b (its shard)."""
        batch = self.global_batch(order, b)
        start, stop = shard_bounds(len(batch), self.rank, self.world)
        return batch[start:stop]

    def __iter__(self):
        epoch = self.epoch = self._next_epoch
        self._next_epoch = epoch + 1
        order = self.order(epoch)
        parts = [self.local_part(order, b) for b in range(len(self))]
        key = lambda b: b * self.world + self.rank   # noqa: E731  the augmentation stream of (b, rank)
        if self.prefetch == 0:
            return (self.make_batch(idx, epoch, key(b)) for b, idx in enumerate(parts))
        return _prefetched(lambda b: self.make_batch(parts[b], epoch, key(b)), len(parts), self.prefetch)

    def __repr__(self) -> str:
        return super().__repr__().replace("DataLoader(", f"ShardedLoader(rank={self.rank}, world={self.world}, ", 1)
