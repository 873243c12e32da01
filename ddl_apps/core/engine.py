"""The training loop both engines share, and what each framework's engine supplies to it.

The loop runs global steps of each epoch until the next event (a log line, a checkpoint, run.max_steps, the
epoch's end), each worker reading its share of every step through the feed (core/feed.py); the checkpointer
(core/checkpointer.py) saves and restores, the evaluator (core/evaluator.py) evaluates, and core/run_end.py ends
the run. A framework engine supplies `run_steps` (train given global steps of the epoch), `predict_batch`,
`current_lr`, `weights_arrays`, `parameter_bytes`, and `write_state` / `restore_state` for checkpoints; one whose
model is partly sharded across ranks also gathers it whole (`gather_state`, `exportable_model`). For elastic
training (core/elastic.py) each names its Horovod elastic module (`elastic`), hands its state over in memory
(`modules_state_dict`, `load_modules_state_dict`), reads checkpoints on one rank (`load_checkpoint`) and follows a
change of workers (`resized`).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ddl_apps.core import checkpoint as ckpt
from ddl_apps.core import dist, rundir
from ddl_apps.core.checkpointer import Checkpointer, Found, batch_settings
from ddl_apps.core.contract import BatchSource, Task
from ddl_apps.core.early_stopping import EarlyStopping
from ddl_apps.core.evaluator import Evaluator, Outputs
from ddl_apps.core.feed import Feed, train_examples
from ddl_apps.core.metrics import LossWindow, RunLog, SilentLog, Throughput
from ddl_apps.core.schedule import epoch_steps, lr_factor, scaled_lr
from ddl_apps.core.state import TrainState
from ddl_apps.errors import TrainingError
from ddl_apps.recipe import Recipe


class Engine(ABC):
    init: Any  # staticmethod: start Horovod for this framework, return the Topology
    elastic: str  # the Horovod module whose elastic.run trains this engine under `ddl train --elastic`
    model: Any
    tensor_files = ckpt.NUMPY  # how this framework's tensors go into a checkpoint's safetensors files

    def __init__(self, recipe: Recipe, task: Task, topology: dist.Topology, run_dir: Path, training: bool = True):
        """With training=False: only the model (for evaluating an exported one), no optimizer, nothing written."""
        self.recipe, self.task, self.topo, self.run_dir = recipe, task, topology, run_dir
        self.training = training
        self.log = RunLog(run_dir, recipe.run.progress, recipe) if training and topology.is_root else SilentLog()
        optim = recipe.optim
        self.batch_workers = recipe.dist.batch_workers or topology.size  # the workers the global batch is sized for
        self.global_batch, self.steps_per_epoch = epoch_steps(recipe, train_examples(task.train), topology.size)
        self.feed = Feed(task.train, recipe.run.seed, self.global_batch, optim.batch_size)
        self.base_lr = scaled_lr(optim, self.batch_workers, recipe.dist.scale_lr)
        self.total_steps = self.steps_per_epoch * optim.epochs
        self.state = TrainState()
        stopping = recipe.run.early_stopping
        self.early_stopping = EarlyStopping(stopping) if stopping and training else None
        self.throughput = Throughput()
        self.skipped_steps: list[int] = []  # steps left out for non-finite gradients (optim.nonfinite=skip)
        self.checkpointer = Checkpointer(run_dir / rundir.CHECKPOINTS, recipe.run.keep_checkpoints,
                                         batch_settings(optim, self.batch_workers))
        self.evaluator = Evaluator(self.predict_batch, task.metrics, optim.batch_size * 4)

    @staticmethod
    def check_recipe(recipe: Recipe, task: Task, size: int) -> None:
        """Settings or a task this engine cannot train (a RecipeError), checked before the run directory is
        written."""
        del recipe, task, size  # every setting the shared loop accepts, the base engine trains

    def lr_factor(self, step: int) -> float:
        optim = self.recipe.optim
        return lr_factor(step, optim.warmup_steps, self.total_steps, optim.schedule)

    # ---- what each framework supplies -----------------------------------------------------------------
    @abstractmethod
    def run_steps(self, first: int, count: int) -> list[float]:
        """Train global steps first..first+count-1 of the current epoch (self.feed has this rank's batches); return
        this rank's mean loss of each step (NaN for a step skipped for non-finite gradients)."""

    @abstractmethod
    def statistics(self) -> list:
        """The model's float state that follows each rank's own batches rather than the gradients (BatchNorm's
        running mean and variance), as framework tensors."""

    @abstractmethod
    def assign_statistics(self, values: list) -> None: ...

    def average_statistics(self) -> None:
        """Collective: average the statistics, so every checkpoint, evaluation and export sees one model on every
        rank (as Horovod's examples average BN statistics)."""
        statistics = self.statistics()
        if self.topo.size > 1 and statistics:
            self.assign_statistics(dist.average_tensors(statistics))

    @abstractmethod
    def predict_batch(self, batch: dict[str, Any]) -> Outputs: ...

    @abstractmethod
    def current_lr(self) -> float: ...

    @abstractmethod
    def weights_arrays(self) -> Iterator[np.ndarray]:
        """Collective (consume it whole): the whole model's weights one array at a time (sharded parts gathered),
        identical on every rank."""

    @abstractmethod
    def snapshot_weights(self) -> Any:
        """Collective: a copy of the whole model's weights (sharded parts gathered), to load back later."""

    @abstractmethod
    def load_snapshot(self, weights: Any) -> None:
        """Load what snapshot_weights copied (each rank keeps its own rows of sharded parts)."""

    @abstractmethod
    def parameter_bytes(self) -> dict[str, int]:
        """Memory this rank's parameters take: `parameters` in all, and the part that is sharded across ranks."""

    def gather_state(self) -> Any:
        """Collective: what this rank's write_state needs from the others (sharded weights and optimizer state)."""
        return None

    writes_shards = False  # whether every rank writes its own part of a checkpoint (write_shards)

    def write_shards(self, folder: Path) -> dict[str, str]:
        """Every rank: its shards of the state into a checkpoint's folder, fsynced; {file name: SHA-256}."""
        raise NotImplementedError

    def exportable_model(self) -> Any:
        """Collective: the model to export, whole on every rank."""
        return self.model

    @abstractmethod
    def write_state(self, folder: Path, gathered: Any) -> None:
        """Rank 0: model, optimizer and schedule state into a checkpoint folder (`gathered`: gather_state's)."""

    @abstractmethod
    def restore_state(self, checkpoint: Path | None) -> None:
        """Collective: rank 0 gets the path (others None) and every rank ends with its state."""

    @abstractmethod
    def load_exported(self, model_dir: Path) -> None:
        """Load the weights a run exported into self.model."""

    def rng_state(self) -> np.ndarray:
        """This rank's RNG state as a byte array (frameworks that keep RNG state in the model return empty)."""
        return np.zeros(0, dtype=np.uint8)

    def set_rng_state(self, state: np.ndarray) -> None:
        del state  # nothing to restore where the RNG state lives in the model

    # elastic training (engines with elastic = True)
    def modules_state_dict(self) -> dict[str, Any]:
        """A copy in memory of the model, optimizer and schedule state."""
        raise NotImplementedError

    def load_modules_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Load a checkpoint on this rank alone (no collective)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything training needs to go on, in memory: where it stands and the framework's state."""
        state = {"train_state": self.state.state_dict(), "modules": self.modules_state_dict()}
        if self.early_stopping is not None:
            state["early_stopping"] = self.early_stopping.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_modules_state_dict(state["modules"])
        self.state.load_state_dict(state["train_state"])
        if self.early_stopping is not None:
            self.early_stopping.load_state_dict(state.get("early_stopping"))

    def resized(self, topology: dist.Topology) -> None:
        """After workers left or joined: the new rank and size; a rank that became rank 0 starts writing the log, one
        that is no longer rank 0 stops."""
        self.topo = topology
        if self.training and topology.is_root and type(self.log) is SilentLog:
            self.log = RunLog(self.run_dir, self.recipe.run.progress, self.recipe)
        elif not topology.is_root and type(self.log) is not SilentLog:
            self.log.close(run_ended=False)
            self.log = SilentLog()

    def placed(self, hosts: list[str]) -> None:
        """Which rank runs on which host (`hosts`, by rank), when there is more than one worker."""
        if len(hosts) > 1:
            self.log.message(f"{len(hosts)} workers: {dist.placement(hosts)}")

    def handed_over(self, holder: int, hosts: list[str]) -> None:
        """After workers changed, every worker took the newest commit, rank `holder`'s; `hosts`, by rank."""
        self.log.message(f"workers changed: training goes on with {self.topo.size} workers from step "
                         f"{self.state.step}, the last commit (rank {holder}'s): {dist.placement(hosts)}")

    # ---- the loop -------------------------------------------------------------------------------------
    def _next_event(self) -> int:
        """Steps until the next log line, checkpoint, max_steps or the end of the epoch."""
        run, step = self.recipe.run, self.state.step
        bounds = [self.steps_per_epoch - self.state.step_in_epoch, run.log_every - step % run.log_every]
        if run.checkpoint_every:
            bounds.append(run.checkpoint_every - step % run.checkpoint_every)
        if run.max_steps:
            bounds.append(run.max_steps - step)
        return max(1, min(bounds))

    def train_loop(self, commit: Callable[[], None] = lambda: None) -> bool:
        """Train to the end of the last epoch (True) or to run.max_steps (False), checkpointing as the recipe says;
        `commit` (elastic runs) saves the state in memory at each log line, checkpoint and epoch end."""
        run, optim = self.recipe.run, self.recipe.optim
        self.log.start(self.total_steps, self.state.step)
        window = LossWindow()
        stopped = self._max_steps_reached()
        if stopped:
            self.log.message(f"run.max_steps={run.max_steps} is reached at step {self.state.step}: nothing to "
                             "train; raise run.max_steps (or leave it out) to go on")
        while self.state.epoch < optim.epochs and not stopped and not self._stopped_early():
            while self.state.step_in_epoch < self.steps_per_epoch:
                count = self._next_event()
                started = time.perf_counter()
                losses = np.asarray(self.run_steps(self.state.step_in_epoch, count), dtype=np.float64)
                self.average_statistics()
                self.throughput.add(count * self.global_batch, time.perf_counter() - started)
                window.add(losses, count * self.global_batch)
                loss_sum, finite_steps, nonfinite = dist.allreduce_sum(
                    [window.loss, window.steps, (~np.isfinite(losses)).sum()])
                if nonfinite and optim.nonfinite == "stop":
                    self._stop_at_nonfinite(losses)
                self._report_skipped()
                self.state.advance(count)
                self.log.advance(count)
                if self.state.step % run.log_every == 0:
                    self.log.step(self.state.step, {"loss": loss_sum / finite_steps if finite_steps else math.nan,
                                                    "lr": self.current_lr(), "samples_per_s": window.rate()})
                    window = LossWindow()
                stopped = self._max_steps_reached()
                if stopped or self.state.step_in_epoch == self.steps_per_epoch:
                    break  # the checkpoint below, once
                if run.checkpoint_every and self.state.step % run.checkpoint_every == 0:
                    self.checkpointer.save(self)
                commit()
            if not stopped:
                self.state.next_epoch()
                self._validate()
            self.checkpointer.save(self)
            commit()
            if self.early_stopping is not None and self.early_stopping.stopped:
                self.log.message(self.early_stopping.stop_message(self.state.epoch, optim.epochs))
        if not stopped:
            self._load_best()
        return not stopped

    def _validate(self) -> None:
        """Collective: evaluate the validation split after an epoch (if the recipe asks), and early stopping takes
        the metrics."""
        if not (self.recipe.run.eval_every_epoch or self.early_stopping):
            return
        metrics = self.evaluate(self.task.valid)[0]
        self.log.record("valid", self.state.step, metrics)
        if self.early_stopping is not None:
            self.early_stopping.update(metrics, self.state.epoch, self.state.step, self.snapshot_weights)

    def _stopped_early(self) -> bool:
        return self.early_stopping is not None and self.early_stopping.stopped

    def _load_best(self) -> None:
        """At the end of training with early stopping: the best state is the model from here on (what is evaluated
        and exported)."""
        if self.early_stopping is not None and self.early_stopping.weights is not None:
            self.load_snapshot(self.early_stopping.weights)
            self.log.message(self.early_stopping.restored_message())

    def _max_steps_reached(self) -> bool:
        max_steps = self.recipe.run.max_steps
        return max_steps is not None and self.state.step >= max_steps

    def _stop_at_nonfinite(self, losses: np.ndarray) -> None:
        """Collective: raise on every rank, naming the first step whose loss was NaN or infinite on any rank."""
        bad = np.flatnonzero(~np.isfinite(losses))
        mine = self.state.step + 1 + bad[0] if len(bad) else np.iinfo(np.int64).max
        first = int(dist.allgather_array(np.array([mine], dtype=np.int64)).min())
        raise TrainingError(
            f"the loss became NaN or infinite at step {first} (epoch {self.state.epoch + 1}); the last checkpoint "
            f"is in {self.run_dir / rundir.CHECKPOINTS}. Lower optim.lr, set optim.clip_grad_norm, look for "
            "NaN/Inf in the data, or set optim.nonfinite=skip to leave such steps out"
        )

    def _report_skipped(self) -> None:
        for step in self.skipped_steps:
            self.log.message(f"step {step}: non-finite gradients, step skipped (optim.nonfinite=skip)")
        self.skipped_steps.clear()

    def evaluate(self, source: BatchSource) -> tuple[dict[str, float], Outputs]:
        """Collective: a split's metrics and its predictions, gathered in order."""
        return self.evaluator.evaluate(source, self.topo)

    def restore(self, found: Found | None) -> None:
        """Continue from the checkpoint find_checkpoint found (None on ranks other than 0 under --elastic)."""
        self.checkpointer.restore(self, found, dist.is_elastic())
        if found is not None:
            self.log.message(f"resumed from {found.path} at step {self.state.step}")
        if self.batch_workers != self.topo.size:
            optim = self.recipe.optim
            self.log.message(f"the global batch stays {optim.batch_size} x {self.batch_workers} workers x "
                             f"{optim.accumulation} = {self.global_batch} examples, shared by {self.topo.size} "
                             "worker(s)")
