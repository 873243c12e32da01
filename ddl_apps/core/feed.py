"""The training examples each worker reads, global step by global step: from a random-access source by index (every
worker knows the epoch's order and takes its share of each step), or from a streamed source, which hands each
worker only its own share (core/contract.py, StreamSource)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

import numpy as np

from ddl_apps.core import dist, sharding
from ddl_apps.core.contract import BatchSource, StreamSource

Step = list[dict[str, Any]]  # one worker's micro-batches of one global step
Item = TypeVar("Item")


class LiveIterator(Generic[Item]):
    """An iterator kept between calls: asked for the position the last call reached, it is handed back (reading
    on where it stopped); asked for any other, a new one is opened there."""

    def __init__(self) -> None:
        self._position: Hashable = None
        self._iterator: Iterator[Item] | None = None

    def at(self, position: Hashable, open_at: Callable[[], Iterator[Item]]) -> Iterator[Item]:
        if self._iterator is None or self._position != position:
            self._iterator = open_at()
        self._position = None  # until the caller says where it stopped
        return self._iterator

    def reached(self, position: Hashable) -> None:
        self._position = position


def train_examples(source: BatchSource | StreamSource) -> int:
    """The examples of one epoch of a training source (a stream knows it without being read)."""
    return source.examples if isinstance(source, StreamSource) else len(source)


def examples_in(batch: dict[str, Any]) -> int:
    return len(next(iter(batch.values())))


class Feed:
    """This worker's micro-batches of each global step, from any step of any epoch on. Successive calls that go on
    where the last one stopped read on from the same iterator: a stream is opened once an epoch, not at every log
    line."""

    def __init__(self, source: BatchSource | StreamSource, seed: int, global_batch: int, batch_size: int):
        self.source, self.seed, self.global_batch, self.batch_size = source, seed, global_batch, batch_size
        self.examples = train_examples(source)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order), random-access sources
        self._live: LiveIterator[Step] = LiveIterator()

    def steps(self, epoch: int, first: int, count: int, topo: dist.Topology) -> Iterator[Step]:
        """Global steps first..first+count-1 of `epoch`, this worker's micro-batches of each."""
        live = self._live.at((epoch, first, topo.rank, topo.size), lambda: self._open(epoch, first, topo))
        for _ in range(count):
            yield next(live)
        self._live.reached((epoch, first + count, topo.rank, topo.size))

    def micro_batches(self, size: int) -> int:
        """How many micro-batches each of `size` workers runs per step."""
        return sharding.micro_batches_per_step(self.global_batch, self.batch_size, size)

    def _open(self, epoch: int, first: int, topo: dist.Topology) -> Iterator[Step]:
        if isinstance(self.source, StreamSource):
            return self.source.rank_steps(epoch, first, self.global_batch, topo.rank, topo.size,
                                          self.micro_batches(topo.size))
        source = self.source
        return ([source.take(indices) for indices in self.rank_batches(epoch, step, topo)]
                for step in range(first, sharding.steps_per_epoch(self.examples, self.global_batch)))

    # ---- random-access sources -------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's order of training examples; bucketed by length when the source has `lengths`."""
        if self._order is None or self._order[0] != epoch:
            lengths = getattr(self.source, "lengths", None)
            order = (sharding.epoch_order(self.examples, self.seed, epoch) if lengths is None else
                     sharding.bucketed_order(np.asarray(lengths), self.seed, epoch, self.global_batch))
            self._order = (epoch, order)
        return self._order[1]

    def rank_batches(self, epoch: int, step: int, topo: dist.Topology) -> list[np.ndarray]:
        """This worker's micro-batches (example indices) of global step `step` of `epoch`."""
        return sharding.rank_step_batches(self.epoch_order(epoch), step, self.global_batch, topo.rank, topo.size,
                                          self.micro_batches(topo.size))
