"""Epoch-seeded sharded sampler that yields (epoch, index) keys.

Each epoch draws one permutation of the dataset from ``seed + epoch`` (the
same on every rank), pads it by wrapping to a multiple of the world size, and
rank r takes positions r, r + W, r + 2W, ... With a per-rank batch B and
``drop_last``, step s of rank r therefore reads permutation positions
``W * B * s + r + W * j`` (j < B): the union over ranks at step s is exactly
the slice ``[W*B*s, W*B*(s+1))`` a single process with batch W*B reads.

``start_step`` skips the first steps of the epoch (exact mid-epoch resume).
"""
from __future__ import annotations

import torch


class ShardedSampler(torch.utils.data.Sampler):
    def __init__(self, dataset_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        if dataset_size <= 0:
            raise ValueError("empty dataset")
        self.dataset_size, self.world_size, self.rank = dataset_size, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_index = 0, 0
        self.per_rank = -(-dataset_size // world_size)  # ceil

    def set_epoch(self, epoch: int, start_step: int = 0, batch_size: int = 1) -> None:
        self.epoch, self.start_index = epoch, start_step * batch_size

    def __len__(self) -> int:
        return self.per_rank - self.start_index

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        padded = (order * (-(-self.per_rank * self.world_size // len(order))))[: self.per_rank * self.world_size]
        mine = padded[self.rank::self.world_size]
        for index in mine[self.start_index:]:
            yield (self.epoch, index)
