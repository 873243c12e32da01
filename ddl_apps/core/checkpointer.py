"""The checkpointer: saves an engine's state with every rank's RNG state, finds the newest valid checkpoint, and
restores it; on --resume it keeps the global batch the checkpoints were trained with (or refuses another)."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from ddl_apps.core import checkpoint as ckpt
from ddl_apps.core import dist
from ddl_apps.core import early_stopping as stopping
from ddl_apps.core.state import TrainState
from ddl_apps.errors import CheckpointError, RecipeError
from ddl_apps.recipe import OptimConfig, Recipe

PROGRESS_FILE = "progress.json"  # the TrainState, the worker count and the batch settings
BATCH_KEYS = ("batch_size", "batch_workers", "accumulation")  # what sizes the global batch trained


class Found(NamedTuple):
    """A checkpoint to resume from and what its progress file holds, with every rank's RNG state (`rng`)."""

    path: Path
    saved: dict[str, Any]


class Checkpointable(Protocol):
    """What the checkpointer needs of an engine: where training stands, and the framework's state."""

    topo: dist.Topology
    state: TrainState
    writes_shards: bool  # every rank writes its own shards of the state (write_shards)
    early_stopping: stopping.EarlyStopping | None
    tensor_files: ckpt.TensorFiles

    def rng_state(self) -> np.ndarray: ...
    def set_rng_state(self, state: np.ndarray) -> None: ...
    def gather_state(self) -> Any: ...
    def write_shards(self, folder: Path) -> dict[str, str]: ...
    def write_state(self, folder: Path, gathered: Any) -> None: ...
    def restore_state(self, checkpoint: Path | None) -> None: ...
    def load_checkpoint(self, checkpoint: Path) -> None: ...


def batch_settings(optim: OptimConfig, batch_workers: int) -> dict[str, int]:
    """What sizes the global batch (batch_size x batch_workers x accumulation), as a checkpoint records it."""
    return {"batch_size": optim.batch_size, "batch_workers": batch_workers, "accumulation": optim.accumulation}


def _saved_batch(saved: dict) -> dict[str, int] | None:
    """The batch settings in a checkpoint's progress (None in checkpoints older than them)."""
    return {key: saved[key] for key in BATCH_KEYS} if all(isinstance(saved.get(key), int) for key in BATCH_KEYS) \
        else None


def trained_batch(checkpoints: Path) -> dict[str, int] | None:
    """The batch settings the run's checkpoints were trained with (the same in each; the newest readable one's,
    nothing verified: for the launcher of an elastic run), or None when there is none."""
    for checkpoint in reversed(ckpt.list_checkpoints(checkpoints)):
        try:
            batch = _saved_batch(json.loads((checkpoint / PROGRESS_FILE).read_text()))
        except (OSError, ValueError):
            continue
        if batch is not None:
            return batch
    return None


def find_checkpoint(checkpoints: Path) -> Found:
    """The newest good checkpoint (newer corrupt ones are named on stderr and set aside); a CheckpointError when
    there is none."""
    found = ckpt.latest_valid(checkpoints, lambda text: print(text, file=sys.stderr, flush=True))
    if found is None:
        raise CheckpointError(f"--resume found no usable checkpoint in {checkpoints}; start a new run without --resume")
    saved = json.loads((found / PROGRESS_FILE).read_text())
    return Found(found, {**saved, "rng": ckpt.load_state(found, "rng")["by_rank"]})


def keep_trained_batch(recipe: Recipe, saved: dict) -> None:
    """--resume keeps the global batch the checkpoints were trained with (`saved`: their batch settings, or a
    progress holding them), whatever the number of workers now: the workers share it (as under --elastic), so the
    steps, the examples of each step and the learning rates are those of the run resumed. Another batch_size,
    accumulation or dist.batch_workers is refused."""
    trained = _saved_batch(saved)
    if trained is None:
        return
    asked = batch_settings(recipe.optim, recipe.dist.batch_workers or trained["batch_workers"])
    if asked != trained:
        changed = ", ".join(f"{'dist' if k == 'batch_workers' else 'optim'}.{k}={asked[k]} (trained: {trained[k]})"
                            for k in BATCH_KEYS if asked[k] != trained[k])
        raise RecipeError(
            f"--resume continues a run trained with a global batch of {trained['batch_size']} x "
            f"{trained['batch_workers']} workers x {trained['accumulation']}, but {changed}; resume with the trained "
            "values (any number of workers shares that global batch), or start a new run without --resume"
        )
    recipe.dist.batch_workers = asked["batch_workers"]


class Checkpointer:
    """Checkpoints of one run: `root` holds them, the `keep` newest are kept, `batch` is the batch settings."""

    def __init__(self, root: Path, keep: int, batch: dict[str, int]):
        self.root, self.keep, self.batch = root, keep, batch

    def save(self, engine: Checkpointable) -> None:
        """Collective (gathers every rank's RNG state and what the engine's write_state needs); rank 0 writes, and
        every rank its shards where the engine writes them (into the folder rank 0 began; it completes it)."""
        rng = dist.allgather_array(engine.rng_state()[None])
        gathered = engine.gather_state()
        folder, digests = None, {}
        if engine.writes_shards:
            folder = dist.on_root(ckpt.begin_checkpoint, self.root, engine.state.step)
            try:
                digests = {name: digest for written in dist.on_every_rank(engine.write_shards, folder)
                           for name, digest in written.items()}
            except Exception:
                if engine.topo.is_root:
                    shutil.rmtree(folder, ignore_errors=True)
                raise
        if not engine.topo.is_root:
            return

        def write(folder: Path) -> None:
            engine.write_state(folder, gathered)
            ckpt.save_state(folder, "rng", {"by_rank": rng})
            if engine.early_stopping is not None:
                stopping.save(engine.early_stopping, folder, engine.tensor_files)
            progress = {**engine.state.state_dict(), "size": engine.topo.size, **self.batch}
            (folder / PROGRESS_FILE).write_text(json.dumps(progress))

        ckpt.write_checkpoint(self.root, engine.state.step, write, self.keep, folder, digests)

    @staticmethod
    def restore(engine: Checkpointable, found: Found | None, elastic: bool) -> None:
        """Collective: every rank ends with the state of the checkpoint find_checkpoint found (rank 0 reads it), and
        its own RNG state when the worker count is the one saved. Under --elastic only rank 0 has found it and
        reads it (a worker joining later must not meet a collective here); the elastic start hands it to the
        others."""
        if elastic:
            if found is None:  # (ranks other than 0)
                return
            engine.load_checkpoint(found.path)
            read_stopping = stopping.read  # (rank 0 alone: a worker joining later must meet no collective)
        else:
            assert found is not None, "every rank has the checkpoint rank 0 found"
            engine.restore_state(found.path if engine.topo.is_root else None)
            if found.saved["size"] == engine.topo.size and len(found.saved["rng"]):
                engine.set_rng_state(np.asarray(found.saved["rng"][engine.topo.rank]))
            read_stopping = functools.partial(dist.on_root, stopping.read)  # (rank 0 reads, every rank gets it)
        if engine.early_stopping is not None:
            engine.early_stopping.load_state_dict(read_stopping(found.path, engine.tensor_files))
        engine.state.load_state_dict(found.saved)
