"""A training run from start to end: Horovod started for the trainer's engine, the task built, the run directory
chosen and prepared, a checkpoint restored, the loop (under Horovod elastic with --elastic), the end of the run."""

from __future__ import annotations

import importlib
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ddl_apps.core import dist, elastic, run_end, rundir
from ddl_apps.core.checkpoint import list_checkpoints
from ddl_apps.core.checkpointer import Found, find_checkpoint, keep_trained_batch
from ddl_apps.core.contract import Trainer
from ddl_apps.core.engine import Engine
from ddl_apps.core.evaluator import final_split
from ddl_apps.core.feed import train_examples
from ddl_apps.core.schedule import epoch_steps
from ddl_apps.errors import ClusterError, TrainingError
from ddl_apps.recipe import Recipe

ENGINES = {"torch": ("ddl_apps.core.torch_engine", "TorchEngine"),
           "keras": ("ddl_apps.core.tf_engine", "KerasEngine")}


def engine_class(trainer: Trainer) -> type[Engine]:
    """The engine a trainer names (its framework is imported here, not before)."""
    module, name = ENGINES[trainer.engine]
    return getattr(importlib.import_module(module), name)


def run_training(recipe: Recipe, resume: bool, trainer: Trainer) -> Path:
    """Train a recipe on this process's Horovod worker; returns the run directory."""
    engine_type = engine_class(trainer)
    os.umask(0o077)  # everything a run writes (metrics, checkpoints, the model) is private to the user
    topology = engine_type.init(recipe.dist)
    is_elastic = dist.is_elastic()
    dist.seed_everything(recipe.run.seed + topology.rank)
    # An elastic run gets run.dir from `ddl train` and makes no collective before training starts: a worker that
    # joins later runs this while the others are already training.
    run_dir = (rundir.choose_run_dir(recipe, resume) if is_elastic
               else dist.on_root(rundir.choose_run_dir, recipe, resume))
    task = trainer.load_hooks().build_task(recipe, topology)  # bad data fails here, before any file
    found: Found | None = None  # the checkpoint to resume from, found once, before the engine is sized by its batch
    if resume and not is_elastic:
        found = dist.on_root(find_checkpoint, run_dir / rundir.CHECKPOINTS)
        keep_trained_batch(recipe, found.saved)
    elif resume and topology.is_root:  # (`ddl train --elastic` passes the trained batch to every worker)
        found = find_checkpoint(run_dir / rundir.CHECKPOINTS)
    epoch_steps(recipe, train_examples(task.train), topology.size)
    engine_type.check_recipe(recipe, task, topology.size)
    if not is_elastic:
        dist.on_root(rundir.prepare_run_dir, run_dir, recipe, resume)
    elif topology.is_root and not (run_dir / rundir.CONFIG_FILE).exists():
        rundir.prepare_run_dir(run_dir, recipe, resume)
    with memory_named(recipe, topology.rank):
        engine = engine_type(recipe, task, topology, run_dir)
    hosts = [] if is_elastic else dist.hosts_by_rank()  # (an elastic run says so as it syncs its workers)
    engine.placed(hosts)
    if resume:
        engine.restore(found)

    def train_and_finish(commit=lambda: None) -> run_end.Results:
        return run_end.finish(engine, engine.train_loop(commit))

    if is_elastic:
        elastic.run(engine, engine_type.elastic, train_and_finish)
        return run_dir
    try:
        with memory_named(recipe, topology.rank):
            train_and_finish()
    except Exception as e:
        engine.log.failed()
        if dist.lost_contact(e):
            raise lost_workers(run_dir, hosts, topology.rank) from None
        raise
    return run_dir


@contextmanager
def memory_named(recipe: Recipe, rank: int) -> Iterator[None]:
    """A worker that runs out of memory stops with what it holds and how to hold less (torch's allocator raises a
    RuntimeError; Python a MemoryError)."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not (isinstance(e, MemoryError) or "can't allocate memory" in str(e)):
            raise
        limit = resource.getrlimit(resource.RLIMIT_DATA)[0]
        capped = f" (its RLIMIT_DATA is {limit / 2**30:.2f} GiB)" if limit != resource.RLIM_INFINITY else ""
        fix = ("shard them across the workers with dist.zero=3 (1 shards the optimizer state, 2 also the "
               "gradients), train on more workers, or lower optim.batch_size") if recipe.dist.zero < 3 else \
            "train on more workers (each holds a smaller shard), or lower optim.batch_size"
        raise TrainingError(f"rank {rank} ran out of memory{capped}: {str(e).strip().splitlines()[0]}. With "
                            f"dist.zero={recipe.dist.zero}, each worker holds {ZERO_HOLDS[recipe.dist.zero]}: "
                            f"{fix}") from None


ZERO_HOLDS = {0: "the whole model, its gradients and its optimizer state",
              1: "the whole model and its gradients, and its shard of the optimizer state",
              2: "the whole model, and its shard of the gradients and the optimizer state",
              3: "its shard of the parameters, the gradients and the optimizer state"}


def lost_workers(run_dir: Path, hosts: list[str], rank: int) -> ClusterError:
    """What a worker whose collective failed under it says: which hosts it lost, why that may be, how long it
    waited, and the checkpoint the run can go on from."""
    here = hosts[rank]
    others = sorted(set(hosts) - {here}) or [here]
    timeout = dist.collective_timeout_s()
    waited = f"a collective waits at most dist.timeout_s = {timeout} s for them" if timeout else \
        "MPI waits for them as long as TCP does"
    checkpoints = list_checkpoints(run_dir / rundir.CHECKPOINTS)
    last = f"the last checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
    return ClusterError(f"rank {rank} on {here} lost contact with the other workers (on {', '.join(others)}): one "
                        f"of them failed (its own message, if any, is above), its host died, or the network between "
                        f"the hosts failed ({waited}). {last[0].upper()}{last[1:]}: once every host is back, run the "
                        f"same ddl train command with --resume and run.dir={run_dir}")


def evaluate_exported(recipe: Recipe, run_dir: Path, trainer: Trainer) -> dict[str, float]:
    """Metrics of a run's exported model on its test split (validation split if it has none)."""
    engine_type = engine_class(trainer)
    topology = engine_type.init(recipe.dist)
    task = trainer.load_hooks().build_task(recipe, topology)
    engine = engine_type(recipe, task, topology, run_dir, training=False)
    engine.load_exported(run_dir / rundir.MODEL_DIR)
    return engine.evaluate(final_split(task)[1])[0]
