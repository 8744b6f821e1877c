"""Batches that mix labeled and auxiliary (generated / pseudo-labeled) examples at a fixed fraction.

As in the unlabeled-data line of adversarial training (Carmon et al. 2019; Gowal et al. 2021; Wang et al. 2023),
every batch holds ``round(batch_size * unsup_fraction)`` auxiliary examples and the rest labeled ones, and an epoch
is as many batches as one pass over the labeled data at the full batch size.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["MixedBatchSampler"]


class MixedBatchSampler(Sampler[list[int]]):
    """Yields lists of indices into ``concat(labeled, auxiliary)``: labeled ones are ``0..num_labeled-1``.

    With ``num_aux == 0`` it is a plain shuffled batch sampler. Batches depend only on ``(seed, epoch)``
    (call :meth:`set_epoch`), so a resumed run sees the same batches. Under distributed training each rank takes
    its contiguous slice of every global batch (``batch_size`` is the global batch size).
    """

    def __init__(self, num_labeled: int, batch_size: int, *, num_aux: int = 0, unsup_fraction: float = 0.0,
                 num_batches: int | None = None, drop_last: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if num_labeled < 1:
            raise ValueError("the labeled set is empty.")
        if not 0.0 <= unsup_fraction < 1.0:
            raise ValueError(f"unsup_fraction must be in [0, 1), got {unsup_fraction}.")
        if unsup_fraction > 0 and num_aux < 1:
            raise ValueError("unsup_fraction > 0 needs auxiliary data (an --aux-data file).")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be positive and divisible by the {world_size} ranks.")
        self.num_aux = num_aux if unsup_fraction > 0 else 0
        self.num_unsup_per_batch = round(batch_size * unsup_fraction) if self.num_aux else 0
        self.num_sup_per_batch = batch_size - self.num_unsup_per_batch
        if self.num_sup_per_batch > num_labeled:
            raise ValueError(f"batch of {self.num_sup_per_batch} labeled examples is larger than the "
                             f"{num_labeled} labeled examples: lower --batch-size.")
        self.num_labeled, self.batch_size = num_labeled, batch_size
        if num_batches is None:
            num_batches = (num_labeled // batch_size if drop_last else math.ceil(num_labeled / batch_size)) \
                if not self.num_aux else math.ceil(num_labeled / batch_size)
        self.num_batches = max(1, num_batches)
        self.drop_last = drop_last
        self.seed, self.epoch = seed, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    @staticmethod
    def _stream(n: int, generator: torch.Generator) -> Iterator[int]:
        """Endless concatenated permutations of range(n)."""
        while True:
            yield from torch.randperm(n, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        labeled = self._stream(self.num_labeled, generator)
        aux = self._stream(self.num_aux, generator) if self.num_aux else iter(())
        remaining = self.num_labeled
        for _ in range(self.num_batches):
            n_sup = self.num_sup_per_batch
            if not self.num_aux and not self.drop_last:
                n_sup = min(n_sup, remaining)
                remaining -= n_sup
            sup = [next(labeled) for _ in range(n_sup)]
            unsup = [self.num_labeled + next(aux) for _ in range(self.num_unsup_per_batch)]
            yield self._rank_slice(sup) + self._rank_slice(unsup)

    def _rank_slice(self, indices: list[int]) -> list[int]:
        """This rank's share of ``indices``, so every rank sees the same labeled/auxiliary mix."""
        n, r, w = len(indices), self.rank, self.world_size
        return indices[r * n // w:(r + 1) * n // w]
