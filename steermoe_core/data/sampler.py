"""Which examples go together in a batch, and in which order.

Batches are drawn within one shard and sorted by length, so padding stays small and memory stays
at one shard per worker; shards and batches are shuffled per epoch from the seed, so the order is
a pure function of (seed, epoch) and a resumed run needs only the position within it.
"""

from __future__ import annotations

import random

from steermoe_core.data.dataset import ShardedDataset


def length_bucketed_batches(
    ds: ShardedDataset, batch_size: int, max_batch_seconds: float = 0.0, seed: int = 0, epoch: int = 0, shuffle: bool = True,
    only: set[int] | None = None,
) -> list[list[int]]:
    """Batches of similar length, each inside one shard; the list order is shuffled per epoch.
    ``only`` restricts them to those example indices."""
    rng = random.Random(seed * 1_000_003 + epoch)
    by_shard: dict[int, list[int]] = {}
    for i, (si, _) in enumerate(ds.rows):
        if only is not None and i not in only:
            continue
        by_shard.setdefault(si, []).append(i)
    shard_order = sorted(by_shard)
    if shuffle:
        rng.shuffle(shard_order)
    batches: list[list[int]] = []
    for si in shard_order:
        idx = sorted(by_shard[si], key=lambda i: (ds.durations[i], i))
        shard_batches, cur = [], []
        for i in idx:
            # sorted ascending, so the padded batch is (len + 1) clips of this one's duration
            padded = (len(cur) + 1) * ds.durations[i]
            if cur and (len(cur) == batch_size or (max_batch_seconds and padded > max_batch_seconds)):
                shard_batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            shard_batches.append(cur)
        if shuffle:
            rng.shuffle(shard_batches)
        batches.extend(shard_batches)
    return batches
