"""Mini-batches over a list of examples: the :class:`ExampleBatches` training source (the ``BatchSource`` protocol of
train/loop.py) and :func:`iter_batches` for evaluation. Used by SFT, classification, and the vision and speech
projects; each passes its own ``collate`` (examples -> a dict of tensors) and, for training only, ``augment``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError

Augment = Callable[[dict[str, Tensor], torch.Generator], dict[str, Tensor]]


class _CollatedBatches(Dataset):
    """Index list -> collated batch, for DataLoader workers (picklable when ``collate`` is: spawn/forkserver)."""

    def __init__(self, items: list[Any], collate: Callable[[list[Any]], dict[str, Tensor]]) -> None:
        self.items, self.collate = items, collate

    def __getitem__(self, idx: list[int]) -> dict[str, Tensor]:
        return self.collate([self.items[i] for i in idx])


def _index_batches(order_of: Callable[[int], list[int]], batch_size: int, epoch: int, pos: int) -> Iterator[list[int]]:
    """The index lists ExampleBatches.next_batch steps through from (epoch, pos) on, forever."""
    order = order_of(epoch)
    while True:
        while pos < len(order):
            yield order[pos : pos + batch_size]
            pos += batch_size
        epoch, pos = epoch + 1, 0
        order = order_of(epoch)


def _epoch_order(n: int, seed: int, shuffle: bool, epoch: int) -> list[int]:
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def _identity(batch: Any) -> Any:
    return batch


class ExampleBatches:
    """Shuffled mini-batches over a list of examples, epoch after epoch, with an exactly resumable position.

    The order of epoch ``e`` is a permutation seeded with ``seed + e``, so ``state_dict()`` is just two integers.

    ``augment(batch, generator)``, when given, transforms every collated batch (data augmentation: training sources
    only, never evaluation). It runs in this process with a generator seeded from (seed, epoch, position) of that
    batch, so augmentation is reproducible, independent of ``num_workers``, and a resumed run draws exactly what the
    uninterrupted run would have drawn: the position is the whole random state.

    ``num_workers > 0`` collates in DataLoader worker processes, prefetching ahead of training; the batches, their
    order and ``state_dict()`` (which counts batches consumed, not prefetched) are the same as with 0. One DataLoader
    streams across epoch boundaries (workers start once, not every epoch) and is dropped by ``load_state_dict`` and
    ``close``. Under the spawn/forkserver start methods ``collate`` and the items are pickled to every worker, so
    ``collate`` must be a module-level function or a functools.partial of one (``sft_collate`` and
    ``classify_collate`` are); the Linux default, fork, needs no pickling.
    """

    def __init__(
        self,
        items: Sequence[Any],
        batch_size: int,
        collate: Callable[[list[Any]], dict[str, Tensor]],
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        augment: Augment | None = None,
    ) -> None:
        if not items:
            raise ConfigError("no training examples")
        self.items, self.batch_size, self.collate, self.augment = list(items), batch_size, collate, augment
        self.seed, self.shuffle, self.num_workers = seed, shuffle, num_workers
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)
        self._prefetched: Iterator[dict[str, Tensor]] | None = None  # the workers' batches, from (epoch, pos) on

    def _permutation(self, epoch: int) -> list[int]:
        return _epoch_order(len(self.items), self.seed, self.shuffle, epoch)

    def _start_workers(self) -> Iterator[dict[str, Tensor]]:
        # The sampler runs in this process and hands each worker one index list; DataLoader returns the batches in
        # sampler order. A partial, not a bound method, so the stream holds no reference back to self.
        order_of = functools.partial(_epoch_order, len(self.items), self.seed, self.shuffle)
        loader = DataLoader(
            _CollatedBatches(self.items, self.collate),
            batch_size=None,  # each sampled key is already a whole batch
            sampler=_index_batches(order_of, self.batch_size, self.epoch, self.pos),
            num_workers=self.num_workers,
            collate_fn=_identity,
        )
        return iter(loader)

    def next_batch(self) -> dict[str, Tensor]:
        if self.num_workers > 0 and self._prefetched is None:
            self._prefetched = self._start_workers()  # before the position moves: the stream starts at this batch
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        epoch, pos = self.epoch, self.pos
        idx = self._order[self.pos : self.pos + self.batch_size]
        self.pos += len(idx)
        batch = next(self._prefetched) if self._prefetched is not None else self.collate([self.items[i] for i in idx])
        if self.augment is None:
            return batch
        # One seed per (epoch, position): the seed + e of the order, spread apart so neighbouring batches differ.
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + pos)
        return self.augment(batch, generator)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.close()  # prefetched batches belong to the old position
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self.epoch)

    def close(self) -> None:
        """Stop the worker processes (if any); the next batch starts new ones at the current position."""
        self._prefetched = None  # dropping the last reference to the DataLoader iterator shuts its workers down


def iter_batches(
    items: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], dict[str, Tensor]]
) -> Iterator[dict[str, Tensor]]:
    """Every item once, in order (evaluation)."""
    for start in range(0, len(items), batch_size):
        yield collate(list(items[start : start + batch_size]))
