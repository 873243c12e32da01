"""The data-parallel engine for TensorFlow / Keras 3 trainers.

Training runs the compiled train step `model.fit` runs (`model.make_train_function()`) with Horovod's Keras
DistributedOptimizer (patched for Keras 3, see third_party/horovod/patches/python), over one tf.data pipeline per
epoch. The shared loop in engine.py decides which global steps run when; each `run_steps` trains the next steps of
that pipeline, which holds exactly the examples of the PyTorch engine, in the same order. Not `model.fit` itself:
a fit per log window would start a new pipeline and fit each time (docs/architecture.md has the cost). State is
checkpointed in the TF checkpoint format; the exported weights are
`model/model.weights.h5`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ddl_apps.core import dist
from ddl_apps.core.contract import BatchSource, Task
from ddl_apps.core.engine import Engine
from ddl_apps.core.feed import LiveIterator
from ddl_apps.core.rundir import MODEL_DIR
from ddl_apps.core.sources import ColumnSource
from ddl_apps.errors import CheckpointError, RecipeError
from ddl_apps.recipe import OptimConfig, Recipe

KERAS_WEIGHTS = "model.weights.h5"
TF_STATE = "state"  # checkpoint prefix: state.index, state.data-*


@keras.saving.register_keras_serializable(package="ddl_apps")
class TableSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """base_lr x factor[optimizer step]; Keras counts micro-batches, so the step is iterations // accumulation."""

    def __init__(self, base_lr: float, factors: list[float], accumulation: int):
        self.base_lr, self.factors, self.accumulation = base_lr, list(factors), accumulation
        self._table = tf.constant(self.factors, dtype=tf.float32)

    def __call__(self, iterations):
        step = tf.minimum(tf.cast(iterations, tf.int64) // self.accumulation, len(self.factors) - 1)
        return self.base_lr * tf.gather(self._table, step)

    def get_config(self) -> dict[str, Any]:
        return {"base_lr": self.base_lr, "factors": self.factors, "accumulation": self.accumulation}


def make_optimizer(optim: OptimConfig, learning_rate) -> keras.optimizers.Optimizer:
    common = {"learning_rate": learning_rate, "global_clipnorm": optim.clip_grad_norm}
    if optim.name == "sgd":
        return keras.optimizers.SGD(momentum=optim.momentum, weight_decay=optim.weight_decay or None, **common)
    if optim.name == "adam":
        return keras.optimizers.Adam(weight_decay=optim.weight_decay or None, **common)
    return keras.optimizers.AdamW(weight_decay=optim.weight_decay, **common)


def augmented(dataset: tf.data.Dataset, augment, seed: int, first: int) -> tf.data.Dataset:
    """`augment(x, y, seed)` on each batch with the seed [seed, index of the batch]: the random draws of a batch
    depend only on where it is (so a resumed run draws what the uninterrupted one drew), not on a random state that
    a prefetching pipeline would have advanced by an unknown number of batches. `first`: the index of the first."""
    def with_seed(index, batch):
        return augment(*batch, tf.stack([tf.constant(seed, tf.int64), index]))

    return dataset.enumerate(start=first).map(with_seed, num_parallel_calls=tf.data.AUTOTUNE)


def batch_seed(run_seed: int, rank: int, epoch: int) -> int:
    """The augmentation seed of one rank's batches in one epoch."""
    return int(np.random.SeedSequence([run_seed, rank, epoch]).generate_state(1, np.uint64)[0] >> 1)


def step_losses(running_means: list[float]) -> np.ndarray:
    """Each step's loss from the running means Keras reports after each step since its metrics were reset."""
    totals = np.asarray(running_means) * np.arange(1, len(running_means) + 1)
    return np.diff(totals, prepend=0.0)


class KerasEngine(Engine):
    init = staticmethod(dist.init_tf)

    def __init__(self, recipe: Recipe, task, topology: dist.Topology, run_dir: Path, training: bool = True):
        assert isinstance(task.train, BatchSource), "check_recipe refuses a streamed split"
        self.train: BatchSource = task.train
        super().__init__(recipe, task, topology, run_dir, training)
        policy = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[recipe.run.precision]
        keras.mixed_precision.set_global_policy(policy)
        self.model = task.build_model()
        # traced once: each epoch's dataset.map then only wraps it, instead of re-tracing the augmentation
        augment = getattr(task, "augment", None)
        self._augment = tf.function(augment, reduce_retracing=True) if augment is not None else None
        if training:
            self._compile(recipe)

    @staticmethod
    def check_recipe(recipe: Recipe, task: Task, size: int) -> None:
        if not isinstance(task.train, BatchSource):
            raise RecipeError(f"{recipe.name}: the Keras engine reads its training split by index (x and y columns); "
                              "a streamed split (StreamSource) needs the PyTorch engine")
        if recipe.optim.nonfinite == "skip":
            raise RecipeError("optim.nonfinite=skip needs the PyTorch engine; with Keras a non-finite loss stops the "
                              "run (optim.nonfinite=stop)")
        workers = recipe.dist.batch_workers
        if workers not in (None, size):
            raise RecipeError(
                f"dist.batch_workers={workers} on {size} worker(s): the Keras engine cannot share a global batch "
                f"sized for {workers} workers among {size} (Horovod's Keras optimizer aggregates the same number of "
                f"micro-batches on every worker, and Adam's step count follows them); run on -np {workers} (a run "
                "resumed with --resume needs the number of workers it was trained on), or leave dist.batch_workers "
                "unset"
            )

    def _compile(self, recipe: Recipe) -> None:
        import horovod.tensorflow.keras as hvd_keras

        optim = recipe.optim
        factors = [self.lr_factor(step) for step in range(self.total_steps + 1)]
        self.schedule = TableSchedule(self.base_lr, factors, optim.accumulation)
        compression = hvd_keras.Compression.fp16 if recipe.dist.compression == "fp16" else hvd_keras.Compression.none
        self.optimizer = hvd_keras.DistributedOptimizer(
            make_optimizer(optim, self.schedule), compression=compression,
            backward_passes_per_step=optim.accumulation, average_aggregated_gradients=True,
        )
        self.model.compile(optimizer=self.optimizer, loss=self.task.loss)
        self.optimizer.build(self.model.trainable_variables)
        self._broadcast_from_root()
        self.model.make_train_function()  # model.train_function: one compiled step on the next batch
        self._stream: LiveIterator[Any] = LiveIterator()  # the epoch's pipeline, at (epoch, next step)

    def _broadcast_from_root(self) -> None:
        """Collective: every rank takes rank 0's weights and optimizer state."""
        import horovod.tensorflow as hvd

        hvd.broadcast_variables(self.model.variables, root_rank=0)
        hvd.broadcast_variables(self.optimizer.variables, root_rank=0)

    # ---- training -------------------------------------------------------------------------------------
    def _open_epoch_at(self, first: int) -> Any:
        """This rank's micro-batches from global step `first` to the end of the epoch, as one tf.data pipeline."""
        steps = range(first, self.steps_per_epoch)
        rank_indices = [np.concatenate(self.feed.rank_batches(self.state.epoch, s, self.topo)) for s in steps]
        batch = self.train.take(np.concatenate(rank_indices))
        dataset = tf.data.Dataset.from_tensor_slices((batch["x"], batch["y"])).batch(self.recipe.optim.batch_size)
        if self._augment is not None:  # the trainer's random augmentation, per batch
            seed = batch_seed(self.recipe.run.seed, self.topo.rank, self.state.epoch)
            dataset = augmented(dataset, self._augment, seed, first * self.recipe.optim.accumulation)
        return iter(dataset.prefetch(tf.data.AUTOTUNE))

    def run_steps(self, first: int, count: int) -> list[float]:
        accumulation = self.recipe.optim.accumulation
        batches = self._stream.at((self.state.epoch, first), lambda: self._open_epoch_at(first))
        self.model.reset_metrics()
        means = [float(self.model.train_function(batches)["loss"]) for _ in range(count * accumulation)]
        self._stream.reached((self.state.epoch, first + count))
        return np.mean(np.reshape(step_losses(means), (count, accumulation)), axis=1).tolist()

    def _statistic_weights(self) -> list:
        return [w for w in self.model.non_trainable_weights if w.dtype.startswith("float")]

    def statistics(self) -> list:
        return [w.value for w in self._statistic_weights()]

    def assign_statistics(self, values: list) -> None:
        for weight, value in zip(self._statistic_weights(), values, strict=True):
            weight.assign(value)

    def current_lr(self) -> float:
        return float(self.schedule(self.optimizer.iterations))

    def predict_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.task.predict(self.model, batch).items()}

    def weights_bytes(self) -> bytes:
        return b"".join(np.asarray(v).tobytes() for v in self.model.weights)

    def parameter_bytes(self) -> dict[str, int]:
        return {"parameters": sum(np.asarray(v).nbytes for v in self.model.weights), "sharded": 0}

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _checkpoint(self) -> tf.train.Checkpoint:
        # The random state of dropout (and any random layer) is an integer seed variable of the model that a
        # checkpoint of the model leaves out; without it a resumed run drew other dropout masks.
        random_state = [v for v in self.model.non_trainable_variables if not v.dtype.startswith("float")]
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, random_state=random_state)

    def write_state(self, folder: Path, gathered: None) -> None:
        self._checkpoint().write(str(folder / TF_STATE))

    def restore_state(self, checkpoint: Path | None) -> None:
        """Rank 0 reads the checkpoint; every rank then takes rank 0's variables."""

        def read() -> None:
            assert checkpoint is not None, "rank 0 gets the checkpoint's path"
            try:
                self._checkpoint().read(str(checkpoint / TF_STATE)).assert_existing_objects_matched()
            except (tf.errors.OpError, AssertionError, ValueError) as e:
                raise CheckpointError(f"cannot restore {checkpoint}: {e}") from None

        dist.on_root(read)
        self._broadcast_from_root()

    def load_exported(self, model_dir: Path) -> None:
        try:
            self.model.load_weights(str(model_dir / KERAS_WEIGHTS))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load weights from {model_dir / KERAS_WEIGHTS}: {e}") from None


def save_weights(model: keras.Model, model_dir: Path) -> None:
    """The exported weights every Keras trainer writes (and `ddl eval` reads)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(model_dir / KERAS_WEIGHTS))


__all__ = ["ColumnSource", "KerasEngine", "MODEL_DIR", "save_weights"]
