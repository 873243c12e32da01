"""The data-parallel engine for TensorFlow / Keras 3 trainers.

Training is `model.fit` with Horovod's Keras DistributedOptimizer (patched for Keras 3, see
third_party/horovod/patches/python) and its broadcast callback. The shared loop in engine.py decides which global
steps run when; each `run_steps` fits exactly the examples of those steps, in the same order as the PyTorch
engine. State is checkpointed in the TF checkpoint format; the exported weights are `model/model.weights.h5`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ddl_apps.core import dist
from ddl_apps.core.engine import ColumnSource, Engine, evaluate_exported, run_training
from ddl_apps.core.rundir import MODEL_DIR
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


class BatchLosses(keras.callbacks.Callback):
    """Each batch's loss in a fit (Keras reports the running mean of the epoch so far)."""

    def on_train_begin(self, logs=None):
        self.means: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.means.append(float(logs["loss"]))

    @property
    def values(self) -> np.ndarray:
        totals = np.asarray(self.means) * np.arange(1, len(self.means) + 1)
        return np.diff(totals, prepend=0.0)


class KerasEngine(Engine):
    init = staticmethod(dist.init_tf)

    def __init__(self, recipe: Recipe, task, topology: dist.Topology, run_dir: Path, training: bool = True):
        super().__init__(recipe, task, topology, run_dir, training)
        policy = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[recipe.run.precision]
        keras.mixed_precision.set_global_policy(policy)
        self.model = task.build_model()
        # traced once: a fresh dataset.map per chunk then only wraps it, instead of re-tracing the augmentation
        augment = getattr(task, "augment", None)
        self._augment = tf.function(augment, reduce_retracing=True) if augment is not None else None
        if training:
            self._compile(recipe)

    def _compile(self, recipe: Recipe) -> None:
        import horovod.tensorflow.keras as hvd_keras

        optim = recipe.optim
        if optim.nonfinite == "skip":
            raise RecipeError("optim.nonfinite=skip needs the PyTorch engine; with Keras a non-finite loss stops the "
                              "run (optim.nonfinite=stop)")
        factors = [self.lr_factor(step) for step in range(self.total_steps + 1)]
        self.schedule = TableSchedule(self.base_lr, factors, optim.accumulation)
        compression = hvd_keras.Compression.fp16 if recipe.dist.compression == "fp16" else hvd_keras.Compression.none
        self.optimizer = hvd_keras.DistributedOptimizer(
            make_optimizer(optim, self.schedule), compression=compression,
            backward_passes_per_step=optim.accumulation, average_aggregated_gradients=True,
        )
        self.model.compile(optimizer=self.optimizer, loss=self.task.loss)
        self.optimizer.build(self.model.trainable_variables)
        self._first_fit_callbacks = [hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0)]

    # ---- training -------------------------------------------------------------------------------------
    def run_steps(self, order: np.ndarray, first: int, count: int) -> list[float]:
        optim = self.recipe.optim
        steps = range(first, first + count)
        indices = np.concatenate([np.concatenate(self.rank_batches(order, step)) for step in steps])
        batch = self.task.train.take(indices)
        dataset = tf.data.Dataset.from_tensor_slices((batch["x"], batch["y"])).batch(optim.batch_size)
        if self._augment is not None:  # the trainer's random augmentation, per batch
            dataset = dataset.map(self._augment, num_parallel_calls=tf.data.AUTOTUNE)
        dataset = dataset.prefetch(tf.data.AUTOTUNE)
        callbacks, self._first_fit_callbacks = self._first_fit_callbacks, []
        losses = BatchLosses()
        self.model.fit(dataset, epochs=1, verbose=0, shuffle=False, callbacks=[*callbacks, losses])
        return np.mean(np.reshape(losses.values, (count, optim.accumulation)), axis=1).tolist()

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
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)

    def write_state(self, folder: Path, gathered: None) -> None:
        self._checkpoint().write(str(folder / TF_STATE))

    def restore_state(self, checkpoint: Path | None) -> None:
        """Rank 0 reads the checkpoint; every rank then takes rank 0's variables."""
        import horovod.tensorflow as hvd

        def read() -> None:
            try:
                self._checkpoint().read(str(checkpoint / TF_STATE)).assert_existing_objects_matched()
            except (tf.errors.OpError, AssertionError, ValueError) as e:
                raise CheckpointError(f"cannot restore {checkpoint}: {e}") from None

        dist.on_root(read)
        hvd.broadcast_variables(self.model.variables, root_rank=0)
        hvd.broadcast_variables(self.optimizer.variables, root_rank=0)

    def load_exported(self, model_dir: Path) -> None:
        try:
            self.model.load_weights(str(model_dir / KERAS_WEIGHTS))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load weights from {model_dir / KERAS_WEIGHTS}: {e}") from None


def save_weights(model: keras.Model, model_dir: Path) -> None:
    """The exported weights every Keras trainer writes (and `ddl eval` reads)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(model_dir / KERAS_WEIGHTS))


def train(recipe: Recipe, resume: bool = False) -> Path:
    """Run a Keras recipe on this process's Horovod worker; returns the run directory."""
    return run_training(recipe, resume, KerasEngine)


def evaluate_run(recipe: Recipe, run_dir: Path) -> dict[str, float]:
    return evaluate_exported(recipe, run_dir, KerasEngine)


__all__ = ["ColumnSource", "KerasEngine", "MODEL_DIR", "save_weights", "train", "evaluate_run"]
