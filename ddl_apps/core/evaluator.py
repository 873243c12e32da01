"""Exact evaluation across ranks: each example of a split predicted on exactly one rank, gathered in order, so
metrics computed on the whole split are those of one process."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ddl_apps.core import dist, sharding
from ddl_apps.core.contract import BatchSource

Outputs = dict[str, np.ndarray]


def predict_split(source: BatchSource, predict_batch: Callable[[dict[str, Any]], Outputs], topo: dist.Topology,
                  batch_size: int) -> Outputs:
    """Collective: per-example predictions for a whole split, in the split's order, on every rank. Every rank runs
    the same number of batches, as a model with sharded parts runs collectives in its forward pass."""
    mine = sharding.eval_shard(len(source), topo.rank, topo.size)
    most = len(sharding.eval_shard(len(source), 0, topo.size))
    chunks = np.array_split(mine, max(1, math.ceil(most / batch_size)))
    parts: dict[str, list[np.ndarray]] = {}
    for chunk in chunks:
        for key, value in predict_batch(source.take(chunk)).items():
            parts.setdefault(key, []).append(value)
    local = {k: np.concatenate(v) for k, v in parts.items()}
    ordered = np.argsort(dist.allgather_array(mine), kind="stable")
    return {k: dist.allgather_array(v)[ordered] for k, v in local.items()}


def final_split(task: Any) -> tuple[str, BatchSource]:
    """The split a finished run is judged on: its test split, or its validation split when it has none."""
    return ("test", task.test) if task.test is not None else ("valid", task.valid)


class Evaluator:
    """Metrics of a split from the task's `metrics`, on predictions made by `predict_batch`."""

    def __init__(self, predict_batch: Callable[[dict[str, Any]], Outputs],
                 metrics: Callable[[Outputs], dict[str, float]], batch_size: int):
        self.predict_batch, self.metrics, self.batch_size = predict_batch, metrics, batch_size

    def evaluate(self, source: BatchSource, topo: dist.Topology) -> tuple[dict[str, float], Outputs]:
        """Collective: the split's metrics and its gathered predictions."""
        outputs = predict_split(source, self.predict_batch, topo, self.batch_size)
        return self.metrics(outputs), outputs
