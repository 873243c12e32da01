"""What the PyTorch and the TensorFlow engines share: the loop over epochs and steps, the learning-rate
schedule, logging, checkpoint cadence, resume bookkeeping, exact evaluation across ranks, and the end of a run.

A framework engine supplies `run_steps` (train on given global steps of an epoch), `predict_batch`,
`current_lr`, `weights_bytes`, `parameter_bytes`, and `write_state` / `restore_state` for checkpoints; one whose
model is partly sharded across ranks also gathers it whole (`gather_state`, `exportable_model`); one that trains
elastically (workers leaving and joining, core/elastic.py) keeps its state in memory (`memory_state`,
`load_memory_state`) and reads checkpoints on one rank (`load_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ddl_apps.core import checkpoint as ckpt
from ddl_apps.core import dist, rundir, sharding
from ddl_apps.core.metrics import RunLog, SilentLog
from ddl_apps.errors import CheckpointError, DataError, RecipeError, TrainingError
from ddl_apps.recipe import OptimConfig, Recipe


class BatchSource(Protocol):
    """A split of a dataset: its length, and a batch for given example indices. A source may also have
    `lengths` (one number per example): training batches are then bucketed by length."""

    def __len__(self) -> int: ...
    def take(self, indices: np.ndarray) -> dict[str, Any]: ...


class ColumnSource:
    """Equal-length columns (numpy arrays or torch tensors) served by index: the fast path for tabular and
    fixed-size data. For a Keras task, columns `x` and `y` feed the tf.data pipeline."""

    def __init__(self, **columns: Any):
        lengths = {len(c) for c in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns differ in length: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def take(self, indices: np.ndarray) -> dict[str, Any]:
        return {k: v[indices] for k, v in self.columns.items()}


class Task(Protocol):
    """What a trainer supplies. `predict` returns per-example arrays; `metrics` sees the whole split.
    Besides: for the PyTorch engine, `loss(model, batch)` -> scalar tensor; for the Keras engine, `loss` (a Keras
    loss), `x` and `y` columns in `train`, and optionally `augment(x, y, seed)` for the tf.data pipeline (random
    draws from the stateless seed given, a [2] int64 tensor, so a resumed run draws the same)."""

    train: BatchSource
    valid: BatchSource
    test: BatchSource | None

    def build_model(self) -> Any: ...
    def predict(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]: ...
    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]: ...
    def export(self, model: Any, model_dir: Path) -> None: ...
    def report(self) -> dict[str, dict[str, float]]: ...
    # optional: write_artifacts(run_dir, outputs) with the final split's gathered predictions (rank 0)


@dataclass
class Progress:
    """Where training stands; with the model, optimizer and schedule, all that resume (or elastic) needs."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0


PROGRESS_FILE = "progress.json"
BATCH_KEYS = ("batch_size", "batch_workers", "accumulation")  # with the progress: the global batch trained


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


def find_checkpoint(checkpoints: Path) -> tuple[Path, dict]:
    """The newest good checkpoint (newer corrupt ones are named on stderr and set aside) and its saved progress
    with every rank's RNG state; a CheckpointError when there is none."""
    found = ckpt.latest_valid(checkpoints, lambda text: print(text, file=sys.stderr, flush=True))
    if found is None:
        raise CheckpointError(f"--resume found no usable checkpoint in {checkpoints}; start a new run without --resume")
    saved = json.loads((found / PROGRESS_FILE).read_text())
    return found, {**saved, "rng": ckpt.load_state(found, "rng")["by_rank"]}


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


@dataclass
class Throughput:
    """Training samples (all ranks) and seconds spent in training steps in this process: no evaluation,
    checkpoints or start-up; the first steps' graph tracing or warm-up is included."""

    samples: int = 0
    seconds: float = 0.0

    def add(self, samples: int, seconds: float) -> None:
        self.samples += samples
        self.seconds += seconds

    def summary(self) -> dict[str, float]:
        return {"samples": self.samples, "seconds": round(self.seconds, 2),
                "samples_per_s": round(self.samples / self.seconds, 1) if self.seconds else 0.0}


class LossWindow:
    """This rank's losses since the last log line (the sum and count of the finite ones) and the samples trained."""

    def __init__(self):
        self.loss, self.steps, self.samples, self.started = 0.0, 0, 0, time.perf_counter()

    def add(self, losses: np.ndarray, samples: int) -> None:
        finite = np.isfinite(losses)
        self.loss += float(losses[finite].sum())
        self.steps += int(finite.sum())
        self.samples += samples

    def rate(self) -> float:
        return self.samples / max(1e-9, time.perf_counter() - self.started)


def epoch_steps(recipe: Recipe, train_examples: int, size: int) -> tuple[int, int]:
    """The global batch and the optimizer steps per epoch; a clear error when not even one step fits."""
    optim, workers = recipe.optim, recipe.dist.batch_workers or size
    global_batch = optim.batch_size * workers * optim.accumulation
    steps = sharding.steps_per_epoch(train_examples, global_batch)
    if steps == 0:
        raise DataError(
            f"the training set ({train_examples} examples) is smaller than one global step "
            f"(batch_size {optim.batch_size} x {workers} workers x accumulation {optim.accumulation}); "
            "lower optim.batch_size or use more data"
        )
    if global_batch < size:
        raise RecipeError(f"the global batch ({optim.batch_size} x {workers} workers x {optim.accumulation} = "
                          f"{global_batch} examples) is smaller than the {size} workers, so some would train on "
                          "nothing; raise dist.batch_workers (or leave it unset) or optim.batch_size")
    return global_batch, steps


def scaled_lr(optim: OptimConfig, size: int, scale: bool) -> float:
    return optim.lr * (size * optim.accumulation if scale else 1)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to 1, then constant, linear or cosine decay to 0 at `total` steps."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    decay = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}
    return warm * decay[schedule]


class Engine(ABC):
    init: Any  # staticmethod: start Horovod for this framework, return the Topology
    elastic: bool = False  # whether this engine can train under `ddl train --elastic`

    def __init__(self, recipe: Recipe, task: Task, topology: dist.Topology, run_dir: Path, training: bool = True):
        """With training=False: only the model (for evaluating an exported one), no optimizer, nothing written."""
        self.recipe, self.task, self.topo, self.run_dir = recipe, task, topology, run_dir
        self.training = training
        self.log = RunLog(run_dir, recipe.run.progress) if training and topology.is_root else SilentLog()
        optim = recipe.optim
        self.batch_workers = recipe.dist.batch_workers or topology.size  # the workers the global batch is sized for
        self.global_batch, self.steps_per_epoch = epoch_steps(recipe, len(task.train), topology.size)
        self.base_lr = scaled_lr(optim, self.batch_workers, recipe.dist.scale_lr)
        self.total_steps = self.steps_per_epoch * optim.epochs
        self.progress = Progress()
        self.throughput = Throughput()
        self.skipped_steps: list[int] = []  # steps left out for non-finite gradients (optim.nonfinite=skip)
        self.commit: Any = lambda: None  # elastic runs: save the state in memory, see core/elastic.py

    @staticmethod
    def check_recipe(recipe: Recipe, size: int) -> None:
        """Settings this engine cannot train (a RecipeError), checked before the run directory is written."""
        del recipe, size  # every setting the shared loop accepts, the base engine trains

    def lr_factor(self, step: int) -> float:
        optim = self.recipe.optim
        return lr_factor(step, optim.warmup_steps, self.total_steps, optim.schedule)

    def rank_batches(self, order: np.ndarray, step: int) -> list[np.ndarray]:
        """This rank's micro-batches (example indices) of global step `step` of the epoch whose order is given."""
        batch_size, size = self.recipe.optim.batch_size, self.topo.size
        micro = sharding.micro_batches_per_step(self.global_batch, batch_size, size)
        return sharding.rank_step_batches(order, step, self.global_batch, self.topo.rank, size, micro)

    # ---- what each framework supplies -----------------------------------------------------------------
    @abstractmethod
    def run_steps(self, order: np.ndarray, first: int, count: int) -> list[float]:
        """Train global steps first..first+count-1 of the epoch whose order is given; return this rank's mean loss
        of each step (NaN for a step skipped for non-finite gradients)."""

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
    def predict_batch(self, batch: dict[str, Any]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def current_lr(self) -> float: ...

    @abstractmethod
    def weights_bytes(self) -> bytes:
        """Collective: the whole model's weights (sharded parts gathered), identical on every rank."""

    @abstractmethod
    def parameter_bytes(self) -> dict[str, int]:
        """Memory this rank's parameters take: `parameters` in all, and the part that is sharded across ranks."""

    def gather_state(self) -> Any:
        """Collective: what this rank's write_state needs from the others (sharded weights and optimizer state)."""
        return None

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
    def memory_state(self) -> dict:
        """A copy in memory of the model, optimizer and schedule state."""
        raise NotImplementedError

    def load_memory_state(self, state: dict) -> None:
        raise NotImplementedError

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Load a checkpoint on this rank alone (no collective)."""
        raise NotImplementedError

    def resized(self, topology: dist.Topology) -> None:
        """After workers left or joined: the new rank and size; a rank that became rank 0 starts writing the log."""
        self.topo = topology
        if self.training and topology.is_root and type(self.log) is SilentLog:
            self.log = RunLog(self.run_dir, self.recipe.run.progress)
            self.log.start(self.total_steps, self.progress.step)
        self.log.message(f"workers changed: training goes on with {topology.size} from step {self.progress.step}")

    # ---- the loop -------------------------------------------------------------------------------------
    def _next_event(self) -> int:
        """Steps until the next log line, checkpoint, max_steps or the end of the epoch."""
        run, step = self.recipe.run, self.progress.step
        bounds = [self.steps_per_epoch - self.progress.step_in_epoch, run.log_every - step % run.log_every]
        if run.checkpoint_every:
            bounds.append(run.checkpoint_every - step % run.checkpoint_every)
        if run.max_steps:
            bounds.append(run.max_steps - step)
        return max(1, min(bounds))

    def fit(self) -> dict[str, dict[str, float]]:
        """Train to the end (or run.max_steps), evaluate and export; under `--elastic`, across workers leaving
        and joining."""
        if not dist.is_elastic():
            return self.train_loop()
        from ddl_apps.core import elastic

        return elastic.run(self)

    def train_loop(self) -> dict[str, dict[str, float]]:
        run, optim = self.recipe.run, self.recipe.optim
        self.log.start(self.total_steps, self.progress.step)
        window = LossWindow()
        stopped = self._max_steps_reached()
        if stopped:
            self.log.message(f"run.max_steps={run.max_steps} is reached at step {self.progress.step}: nothing to "
                             "train; raise run.max_steps (or leave it out) to go on")
        while self.progress.epoch < optim.epochs and not stopped:
            order = self.epoch_order()
            while self.progress.step_in_epoch < self.steps_per_epoch:
                count = self._next_event()
                started = time.perf_counter()
                losses = np.asarray(self.run_steps(order, self.progress.step_in_epoch, count), dtype=np.float64)
                self.average_statistics()
                self.throughput.add(count * self.global_batch, time.perf_counter() - started)
                window.add(losses, count * self.global_batch)
                loss_sum, finite_steps, nonfinite = dist.allreduce_sum(
                    [window.loss, window.steps, (~np.isfinite(losses)).sum()])
                if nonfinite and optim.nonfinite == "stop":
                    self._stop_at_nonfinite(losses)
                self._report_skipped()
                self.progress.step_in_epoch += count
                self.progress.step += count
                self.log.advance(count)
                if self.progress.step % run.log_every == 0:
                    self.log.step(self.progress.step, {"loss": loss_sum / finite_steps if finite_steps else math.nan,
                                                       "lr": self.current_lr(), "samples_per_s": window.rate()})
                    window = LossWindow()
                stopped = self._max_steps_reached()
                if stopped or self.progress.step_in_epoch == self.steps_per_epoch:
                    break  # the checkpoint below, once
                if run.checkpoint_every and self.progress.step % run.checkpoint_every == 0:
                    self.save_checkpoint()
                self.commit()
            if not stopped:
                self.progress.epoch += 1
                self.progress.step_in_epoch = 0
                if run.eval_every_epoch:
                    self.log.record("valid", self.progress.step, self.evaluate(self.task.valid)[0])
            self.save_checkpoint()
            self.commit()
        return self.finish(complete=not stopped)

    def _max_steps_reached(self) -> bool:
        max_steps = self.recipe.run.max_steps
        return bool(max_steps) and self.progress.step >= max_steps

    def _stop_at_nonfinite(self, losses: np.ndarray) -> None:
        """Collective: raise on every rank, naming the first step whose loss was NaN or infinite on any rank."""
        bad = np.flatnonzero(~np.isfinite(losses))
        mine = self.progress.step + 1 + bad[0] if len(bad) else np.iinfo(np.int64).max
        first = int(dist.allgather_array(np.array([mine], dtype=np.int64)).min())
        raise TrainingError(
            f"the loss became NaN or infinite at step {first} (epoch {self.progress.epoch + 1}); the last checkpoint "
            f"is in {self.run_dir / rundir.CHECKPOINTS}. Lower optim.lr, set optim.clip_grad_norm, look for "
            "NaN/Inf in the data, or set optim.nonfinite=skip to leave such steps out"
        )

    def _report_skipped(self) -> None:
        for step in self.skipped_steps:
            self.log.message(f"step {step}: non-finite gradients, step skipped (optim.nonfinite=skip)")
        self.skipped_steps.clear()

    def epoch_order(self) -> np.ndarray:
        """This epoch's order of training examples; bucketed by length when the source has `lengths`."""
        train, seed, epoch = self.task.train, self.recipe.run.seed, self.progress.epoch
        lengths = getattr(train, "lengths", None)
        if lengths is None:
            return sharding.epoch_order(len(train), seed, epoch)
        return sharding.bucketed_order(np.asarray(lengths), seed, epoch, self.global_batch)

    # ---- evaluation -----------------------------------------------------------------------------------
    def predict_split(self, source: BatchSource) -> dict[str, np.ndarray]:
        """Per-example predictions for a whole split, each example on exactly one rank, gathered in order.
        Every rank runs the same number of batches, as a model with sharded parts runs collectives in its
        forward pass."""
        mine = sharding.eval_shard(len(source), self.topo.rank, self.topo.size)
        most = len(sharding.eval_shard(len(source), 0, self.topo.size))
        chunks = np.array_split(mine, max(1, math.ceil(most / (self.recipe.optim.batch_size * 4))))
        parts: dict[str, list[np.ndarray]] = {}
        for chunk in chunks:
            for key, value in self.predict_batch(source.take(chunk)).items():
                parts.setdefault(key, []).append(value)
        local = {k: np.concatenate(v) for k, v in parts.items()}
        ordered = np.argsort(dist.allgather_array(mine), kind="stable")
        return {k: dist.allgather_array(v)[ordered] for k, v in local.items()}

    def evaluate(self, source: BatchSource) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        outputs = self.predict_split(source)
        return self.task.metrics(outputs), outputs

    # ---- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Collective (gathers every rank's RNG state); rank 0 writes."""
        rng = dist.allgather_array(self.rng_state()[None])
        gathered = self.gather_state()
        if not self.topo.is_root:
            return

        def write(folder: Path) -> None:
            self.write_state(folder, gathered)
            ckpt.save_state(folder, "rng", {"by_rank": rng})
            progress = {**asdict(self.progress), "size": self.topo.size,
                        **batch_settings(self.recipe.optim, self.batch_workers)}
            (folder / PROGRESS_FILE).write_text(json.dumps(progress))

        ckpt.write_checkpoint(self.run_dir / rundir.CHECKPOINTS, self.progress.step, write,
                              self.recipe.run.keep_checkpoints)

    def restore(self, found: tuple[Path, dict] | None) -> None:
        """Continue from a checkpoint (find_checkpoint's): state, progress, and (same worker count) RNG. Under
        --elastic rank 0 alone has found it and reads it (a worker joining later must not meet a collective here);
        the elastic start hands its state to the others."""
        if dist.is_elastic():
            if not self.topo.is_root:
                return
            path, saved = found
            self.load_checkpoint(path)
        else:
            path, saved = found
            self.restore_state(path if self.topo.is_root else None)
            if saved["size"] == self.topo.size and len(saved["rng"]):
                self.set_rng_state(np.asarray(saved["rng"][self.topo.rank]))
        self.progress = Progress(saved["epoch"], saved["step_in_epoch"], saved["step"])
        self.log.message(f"resumed from {path} at step {self.progress.step}")
        if self.batch_workers != self.topo.size:
            optim = self.recipe.optim
            self.log.message(f"the global batch stays {optim.batch_size} x {self.batch_workers} workers x "
                             f"{optim.accumulation} = {self.global_batch} examples, shared by {self.topo.size} "
                             "worker(s)")

    # ---- the end of a run -----------------------------------------------------------------------------
    def weights_digest_by_rank(self) -> list[str]:
        """SHA-256 of every rank's weights: all equal unless data parallelism broke."""
        digest = hashlib.sha256(self.weights_bytes()).digest()
        gathered = dist.allgather_array(np.frombuffer(digest, dtype=np.uint8).copy())
        return [bytes(row).hex() for row in gathered.reshape(self.topo.size, -1)]

    def finish(self, complete: bool) -> dict[str, dict[str, float]]:
        results: dict[str, dict[str, float]] = {}
        done = self.throughput.summary()
        self.log.message(f"trained {done['samples']:,} samples in {done['seconds']} s: {done['samples_per_s']} "
                         f"samples/s on {self.topo.size} worker(s)")
        digests = self.weights_digest_by_rank()
        if len(set(digests)) > 1:
            self.log.message(f"[bold red]warning:[/] weights differ across ranks: {digests}")
        memory = self.parameter_bytes()
        memory_by_rank = dist.allgather_array(np.array([list(memory.values())], dtype=np.int64))
        model = self.exportable_model()
        if complete:
            split = "test" if self.task.test is not None else "valid"
            metrics, outputs = self.evaluate(self.task.test if self.task.test is not None else self.task.valid)
            results[f"model ({split})"] = metrics
            self.log.record(split, self.progress.step, metrics)
            if self.topo.is_root:
                np.savez(self.run_dir / f"{split}_outputs.npz", **outputs)
                if hasattr(self.task, "write_artifacts"):  # e.g. a confusion-matrix plot
                    self.task.write_artifacts(self.run_dir, outputs)
                self.task.export(model, self.run_dir / rundir.MODEL_DIR)
                results.update(self.task.report())
                summary = {"results": results, "steps": self.progress.step, "workers": self.topo.size,
                           "training": self.throughput.summary(), "weights_sha256_by_rank": digests,
                           "parameter_bytes_by_rank": [dict(zip(memory, row.tolist(), strict=True))
                                                       for row in memory_by_rank]}
                (self.run_dir / rundir.SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        self.log.close(results)
        return results


def run_training(recipe: Recipe, resume: bool, engine_class: type[Engine]) -> Path:
    """Start Horovod, build the trainer's task, prepare the run directory, train; returns the run directory."""
    from ddl_apps.trainers import load_trainer

    os.umask(0o077)  # everything a run writes (metrics, checkpoints, the model) is private to the user
    topology = engine_class.init(recipe.dist.cycle_time_ms)
    elastic = dist.is_elastic()
    if elastic and not engine_class.elastic:
        raise RecipeError(f"--elastic needs the PyTorch engine; {recipe.name} trains with {engine_class.__name__}")
    dist.seed_everything(recipe.run.seed + topology.rank)
    # An elastic run gets run.dir from `ddl train` and makes no collective before training starts: a worker that
    # joins later runs this while the others are already training.
    run_dir = rundir.choose_run_dir(recipe, resume) if elastic else dist.on_root(rundir.choose_run_dir, recipe, resume)
    task = load_trainer(recipe.trainer).build_task(recipe, topology)  # bad data fails here, before any file
    found = None  # the checkpoint to resume from, found once, before the engine is sized by its batch
    if resume and not elastic:
        found = dist.on_root(find_checkpoint, run_dir / rundir.CHECKPOINTS)
        keep_trained_batch(recipe, found[1])
    elif resume and topology.is_root:  # (`ddl train --elastic` passes the trained batch to every worker)
        found = find_checkpoint(run_dir / rundir.CHECKPOINTS)
    epoch_steps(recipe, len(task.train), topology.size)
    engine_class.check_recipe(recipe, topology.size)
    if not elastic:
        dist.on_root(rundir.prepare_run_dir, run_dir, recipe, resume)
    elif topology.is_root and not (run_dir / rundir.CONFIG_FILE).exists():
        rundir.prepare_run_dir(run_dir, recipe, resume)
    engine = engine_class(recipe, task, topology, run_dir)
    if resume:
        engine.restore(found)
    engine.fit()
    return run_dir


def evaluate_exported(recipe: Recipe, run_dir: Path, engine_class: type[Engine]) -> dict[str, float]:
    """Metrics of a run's exported model on its test split (validation split if it has none)."""
    from ddl_apps.trainers import load_trainer

    topology = engine_class.init(recipe.dist.cycle_time_ms)
    task = load_trainer(recipe.trainer).build_task(recipe, topology)
    engine = engine_class(recipe, task, topology, run_dir, training=False)
    engine.load_exported(run_dir / rundir.MODEL_DIR)
    return engine.evaluate(task.test if task.test is not None else task.valid)[0]
