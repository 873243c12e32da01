"""Horovod initialisation, topology, seeding and collectives for PyTorch.

With launch.py and the engines, this is the only code that imports Horovod; trainers never do.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# Set before Horovod initialises, unless the user chose otherwise.
HOROVOD_DEFAULTS: dict[str, str] = {}


@dataclass(frozen=True)
class Topology:
    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def _apply_horovod_defaults() -> None:
    for key, value in HOROVOD_DEFAULTS.items():
        os.environ.setdefault(key, value)


def init_torch() -> Topology:
    """Start Horovod for PyTorch and give each worker its share of the CPU cores."""
    _apply_horovod_defaults()
    import horovod.torch as hvd
    import torch

    hvd.init()
    topology = Topology(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())
    if torch.cuda.is_available():
        torch.cuda.set_device(topology.local_rank)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // topology.local_size))
    return topology


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def broadcast_object(obj: Any, root_rank: int = 0) -> Any:
    """Rank `root_rank`'s (picklable, in-memory) object on every rank."""
    import horovod.torch as hvd

    return hvd.broadcast_object(obj, root_rank=root_rank)


def on_root(fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn on rank 0 only and give its result, or the exception it raised, to every rank.

    So a failure on rank 0 (a bad run directory, a corrupt checkpoint) stops all ranks with the same error
    instead of leaving the others waiting in the next collective.
    """
    import horovod.torch as hvd

    result = error = None
    if hvd.rank() == 0:
        try:
            result = fn(*args)
        except Exception as e:  # handed to every rank and raised there
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def allreduce_sum(values: np.ndarray | list[float]) -> np.ndarray:
    """Exact float64 sum of a small vector over all ranks (for sums and counts)."""
    import horovod.torch as hvd
    import torch

    tensor = torch.as_tensor(np.asarray(values, dtype=np.float64))
    return hvd.allreduce(tensor, op=hvd.Sum, name=None).numpy()


def allgather_array(array: np.ndarray) -> np.ndarray:
    """Concatenate each rank's array (first dimensions may differ) in rank order, on every rank."""
    import horovod.torch as hvd
    import torch

    return hvd.allgather(torch.from_numpy(np.ascontiguousarray(array))).numpy()


def barrier() -> None:
    import horovod.torch as hvd

    hvd.barrier()
