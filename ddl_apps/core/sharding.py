"""Which examples each rank sees, step by step.

Every rank draws the same permutation of the training set for an epoch (seeded by the run seed and the epoch),
cuts it into global steps of `batch_size x workers x accumulation` examples, and takes its own contiguous slice
of each (`workers` is the number of workers, or an elastic run's --max-np whatever the number now). So np=2 with
batch B visits exactly the examples np=1 with batch 2B visits, in the same steps, and a run resumed at (epoch,
step-in-epoch) continues with exactly the examples it would have seen. The last incomplete global step is dropped
so that all ranks always do the same number of steps.
"""

from __future__ import annotations

import numpy as np


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def bucketed_order(lengths: np.ndarray, seed: int, epoch: int, global_batch: int, window: int = 50) -> np.ndarray:
    """An epoch order whose global steps hold examples of similar length (less padding, and ranks finish their
    share of a step at about the same time): shuffle, set aside the examples that do not fill a last global batch
    (a random few, dropped this epoch), sort each window of `window` global batches by length, cut it into global
    batches, and shuffle the batches. The same on every rank; every example once, the dropped ones last."""
    rng = np.random.default_rng([seed, epoch, 1])
    order = rng.permutation(len(lengths))
    full = len(order) // global_batch * global_batch
    kept, dropped = order[:full], order[full:]
    span = global_batch * window
    sorted_windows = [chunk[np.argsort(lengths[chunk], kind="stable")]
                      for chunk in (kept[i : i + span] for i in range(0, full, span))]
    batches = np.concatenate([*sorted_windows, kept[:0]]).reshape(-1, global_batch)
    return np.concatenate([batches[rng.permutation(len(batches))].reshape(-1), dropped])


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    return num_examples // global_batch


def micro_batches_per_step(global_batch: int, batch_size: int, size: int) -> int:
    """How many micro-batches each of `size` ranks runs per step, none larger than `batch_size`."""
    return -(-global_batch // (size * batch_size))


def rank_step_batches(order: np.ndarray, step: int, global_batch: int, rank: int, size: int,
                      micro_batches: int) -> list[np.ndarray]:
    """The micro-batches (index arrays) rank `rank` runs in global step `step` of an epoch: its contiguous share
    of the step's examples, cut in `micro_batches` parts. When `size` does not divide the global batch (an elastic
    run that lost a worker), shares and parts differ by at most one example, and a share smaller than
    `micro_batches` is cut in fewer parts: never an empty one (whose mean loss is NaN)."""
    examples = order[step * global_batch : (step + 1) * global_batch]
    share = np.array_split(examples, size)[rank]
    return np.array_split(share, min(micro_batches, max(1, len(share))))


def eval_shard(num_examples: int, rank: int, size: int) -> np.ndarray:
    """Every example exactly once across ranks (no padding, no duplicates), so gathered metrics are exact; a
    contiguous range each, so a rank reading a split from storage reads only its part of it."""
    return np.array_split(np.arange(num_examples), size)[rank]


def micro_batch_positions(first: int, count: int, micro_batches: int, rank: int, size: int) -> np.ndarray:
    """Where this worker's micro-batches of steps first..first+count-1 stand among all the workers' in the epoch,
    [count, micro_batches]: with shares that divide the global batch evenly, the same micro-batch has the same
    position whatever the number of workers, and so the same random draws (augmentation, dropout)."""
    steps, within = np.divmod(np.arange(count * micro_batches), micro_batches)
    positions = (first + steps) * micro_batches * size + rank * micro_batches + within
    return positions.reshape(count, micro_batches)


def epoch_seed(run_seed: int, epoch: int, stream: int = 0) -> int:
    """The seed of one epoch's random draws of one kind (`stream`: 0 augmentation, 1 + i the i-th random layer),
    which each micro-batch combines with its position in the epoch (< 2**63)."""
    return int(np.random.SeedSequence([run_seed, epoch, stream]).generate_state(1, np.uint64)[0] >> 1)
