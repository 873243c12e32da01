"""Which examples each rank sees, step by step.

Every rank draws the same permutation of the training set for an epoch (seeded by the run seed and the epoch),
cuts it into global steps of `batch_size x size x accumulation` examples, and takes its own contiguous slice of
each. So np=2 with batch B visits exactly the examples np=1 with batch 2B visits, in the same steps, and a run
resumed at (epoch, step-in-epoch) continues with exactly the examples it would have seen. The last incomplete
global step is dropped so that all ranks always do the same number of steps.
"""

from __future__ import annotations

import numpy as np


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int, size: int, accumulation: int) -> int:
    return num_examples // (batch_size * size * accumulation)


def rank_step_batches(
    order: np.ndarray, step: int, batch_size: int, rank: int, size: int, accumulation: int
) -> list[np.ndarray]:
    """The micro-batches (index arrays) rank `rank` runs in global step `step` of an epoch."""
    per_rank = batch_size * accumulation
    start = step * per_rank * size + rank * per_rank
    mine = order[start : start + per_rank]
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(accumulation)]


def eval_shard(num_examples: int, rank: int, size: int) -> np.ndarray:
    """Every example exactly once across ranks (no padding, no duplicates), so gathered metrics are exact."""
    return np.arange(rank, num_examples, size)
