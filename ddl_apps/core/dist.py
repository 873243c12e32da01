"""Horovod initialisation, topology, seeding and the few collectives the engines need, for PyTorch or TensorFlow.

With launch.py, the engines and core/parallel, this is the only code that imports Horovod; trainers never do. A
process uses one framework's Horovod (each framework's extension carries its own copy of the Horovod core):
`init_torch` or `init_tf` chooses it, and the collectives below then go through that one.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from ddl_apps.cpus import usable_cpus

if TYPE_CHECKING:
    from ddl_apps.recipe import DistConfig


@dataclass(frozen=True)
class Topology:
    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def is_root(self) -> bool:
        return self.rank == 0


class _Collectives:
    """numpy in, numpy out, through the initialised framework's Horovod.

    Each collective has a fixed name: Horovod names an unnamed one afresh on every call, so collectives repeated
    all run long (the loss of each log window, the averaged statistics) filled its response cache of 1,024
    entries and evicted the gradients' ones ("A response has been evicted from cache")."""

    def __init__(self, hvd: ModuleType, to_tensor: Callable[[np.ndarray], Any]):
        self.hvd, self.to_tensor = hvd, to_tensor

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(self.hvd.allreduce(self.to_tensor(array), op=self.hvd.Sum, name="ddl.allreduce_sum"))

    def allgather(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(self.hvd.allgather(self.to_tensor(array), name="ddl.allgather"))

    def average(self, tensors: list) -> list:
        return self.hvd.grouped_allreduce(tensors, op=self.hvd.Average, name="ddl.average")


_collectives: _Collectives | None = None

def _active() -> _Collectives:
    if _collectives is None:
        raise RuntimeError("Horovod is not initialised: call init_torch() or init_tf() first")
    return _collectives


def _start(hvd: ModuleType, to_tensor: Callable[[np.ndarray], Any], cfg: DistConfig) -> Topology:
    """Initialise this framework's Horovod and use it for the collectives from now on.

    Horovod's background thread wakes every HOROVOD_CYCLE_TIME ms (Horovod's default: 1) and negotiates with the
    other ranks even when no tensor is waiting; on a 2-core host at np=2 those wake-ups take CPU from the compute
    threads. The recipe's dist.cycle_time_ms sets it (the environment wins; docs/architecture.md has what it
    costs). Each allreduce waits up to one cycle, so short steps want short cycles. Under Horovod's autotuner
    (HOROVOD_AUTOTUNE=1) it is left unset: a cycle time in the environment is one the tuner may not change.
    dist.timeout_s is how long Gloo waits for the other workers in a collective (HOROVOD_GLOO_TIMEOUT_SECONDS).
    """
    global _collectives
    if os.environ.get("HOROVOD_AUTOTUNE") != "1":
        os.environ.setdefault("HOROVOD_CYCLE_TIME", f"{cfg.cycle_time_ms:g}")
    os.environ.setdefault(GLOO_TIMEOUT, str(cfg.collective_timeout_s(is_elastic())))
    hvd.init()
    _collectives = _Collectives(hvd, to_tensor)
    return topology()


def topology() -> Topology:
    """This worker's place now (under --elastic it changes when workers leave or join)."""
    hvd = _active().hvd
    return Topology(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())


def is_elastic() -> bool:
    """Whether horovodrun started this worker for elastic training."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def _cores_per_worker(local_size: int) -> int:
    return max(1, usable_cpus() // local_size)


def share_torch_cores(topology: Topology) -> None:
    """Give this worker its share of the host's cores (unless OMP_NUM_THREADS says otherwise)."""
    import torch

    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(_cores_per_worker(topology.local_size))


def init_torch(cfg: DistConfig) -> Topology:
    """Start Horovod for PyTorch and give each worker its share of the CPU cores."""
    import horovod.torch as hvd
    import torch

    topology = _start(hvd, lambda a: torch.from_numpy(np.ascontiguousarray(a)), cfg)
    if torch.cuda.is_available():
        torch.cuda.set_device(topology.local_rank)
    share_torch_cores(topology)
    return topology


def init_tf(cfg: DistConfig) -> Topology:
    """Start Horovod for TensorFlow: one GPU per worker when there are GPUs, else a share of the cores."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    topology = _start(hvd, lambda a: tf.constant(np.ascontiguousarray(a)), cfg)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        tf.config.experimental.set_memory_growth(gpus[topology.local_rank], True)
        tf.config.set_visible_devices(gpus[topology.local_rank], "GPU")
    else:  # TensorFlow's own pool ignores OMP_NUM_THREADS, so honour it here as PyTorch does
        threads = os.environ.get("OMP_NUM_THREADS", "")
        cores = int(threads) if threads.isdigit() and int(threads) > 0 else _cores_per_worker(topology.local_size)
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    return topology


def seed_everything(seed: int) -> None:
    """Python, numpy and whichever of torch / TensorFlow (Keras) this process uses."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if _collectives is not None and _collectives.hvd.__name__ == "horovod.tensorflow":
        import keras

        keras.utils.set_random_seed(seed % 2**32)
    else:
        import torch

        torch.manual_seed(seed)


def broadcast_object(obj: Any, root_rank: int = 0) -> Any:
    """Rank `root_rank`'s (picklable, in-memory) object on every rank; the other ranks' `obj` may be of another type
    (None): Horovod names the collective after the type unless given a name, and ranks whose names differ wait for
    each other forever."""
    return _active().hvd.broadcast_object(obj, root_rank=root_rank, name="ddl.broadcast_object")


def on_root(fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn on rank 0 only and give its result, or the exception it raised, to every rank.

    So a failure on rank 0 (a bad run directory, a corrupt checkpoint) stops all ranks with the same error
    instead of leaving the others waiting in the next collective.
    """
    result = error = None
    if _active().hvd.rank() == 0:
        try:
            result = fn(*args)
        except Exception as e:  # handed to every rank and raised there
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def on_every_rank(fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Run fn on every rank and give every rank each rank's result, in rank order; when fn raised on any rank,
    the first rank's exception is raised on all (so no rank goes on to wait for the others)."""
    result = error = None
    try:
        result = fn(*args)
    except Exception as e:  # handed to every rank and raised there
        error = e
    gathered = _active().hvd.allgather_object((result, error))
    for _, raised in gathered:
        if raised is not None:
            raise raised
    return [value for value, _ in gathered]


def allreduce_sum(values: np.ndarray | list[float]) -> np.ndarray:
    """Exact float64 sum of a small vector over all ranks (for sums and counts)."""
    return _active().allreduce_sum(np.asarray(values, dtype=np.float64))


def average_tensors(tensors: list) -> list:
    """The mean of each framework tensor over all ranks, in one grouped collective."""
    return _active().average(tensors)


HOST_BYTES = 255  # (the longest host name)
GLOO_TIMEOUT = "HOROVOD_GLOO_TIMEOUT_SECONDS"


def lost_contact(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because Horovod shut down under it (a worker, its host or the
    network between hosts failed): Horovod's own error in PyTorch, TensorFlow's UnknownError from a Horovod op."""
    from horovod.common.exceptions import HorovodInternalError

    tensorflow_op = type(error).__name__ == "UnknownError" and "Horovod" in str(error)
    return isinstance(error, HorovodInternalError) or tensorflow_op


def collective_timeout_s() -> int | None:
    """How long a collective waits for the other workers (Gloo), or None (MPI has no such timeout)."""
    value = os.environ.get(GLOO_TIMEOUT, "")
    return int(value) if value.isdigit() and _active().hvd.gloo_enabled() else None


def host_name() -> str:
    """This worker's host as its launcher named it (horovodrun's HOROVOD_HOSTNAME, SLURM's node name), else the
    machine's name."""
    return os.environ.get("HOROVOD_HOSTNAME") or os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def hosts_by_rank() -> list[str]:
    """Collective: each rank's host_name, in rank order."""
    name = np.frombuffer(host_name().encode()[:HOST_BYTES].ljust(HOST_BYTES, b"\0"), dtype=np.uint8)
    gathered = allgather_array(name.copy()).reshape(-1, HOST_BYTES)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in gathered]



def allgather_array(array: np.ndarray) -> np.ndarray:
    """Concatenate each rank's array (first dimensions may differ) in rank order, on every rank."""
    return _active().allgather(array)


def placement(hosts: list[str]) -> str:
    """'ranks 0, 1 on node1; ranks 2, 3 on node2' for `hosts` by rank: which rank's lines (tagged [1]... by
    horovodrun, 1: by srun --label) come from which host."""
    ranks: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks.setdefault(host, []).append(rank)
    return "; ".join(f"rank{'s' if len(on) > 1 else ''} {', '.join(map(str, on))} on {host}"
                     for host, on in ranks.items())
