"""The data-parallel engine for TensorFlow / Keras 3 trainers.

Training runs the compiled train step `model.fit` runs (`model.make_train_function()`) with Horovod's Keras
DistributedOptimizer (patched for Keras 3, see third_party/horovod/patches/python), over one tf.data pipeline per
epoch. The shared loop in engine.py decides which global steps run when; each `run_steps` trains the next steps of
that pipeline, which holds exactly the examples of the PyTorch engine, in the same order. Not `model.fit` itself:
a fit per log window would start a new pipeline and fit each time (docs/architecture.md has the cost). State is
checkpointed in the TF checkpoint format; the exported weights are
`model/model.weights.h5`.

Each step runs as many micro-batches as the worker's share of the global batch holds (Keras' gradient
accumulation over them, then one allreduce): under `--elastic` that number changes with the number of workers, and
when the workers do not divide the global batch evenly, each example's loss is weighted so that the allreduced
gradient is still the global batch's mean gradient.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ddl_apps.core import dist, sharding
from ddl_apps.core.contract import BatchSource, StreamSource, Task
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
    """base_lr x factor[optimizer step]; Keras counts micro-batches, so the step is iterations // accumulation
    (the engine keeps `accumulation` equal to the micro-batches of a step, and the train step is traced again when
    it changes)."""

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


class AgreedLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras' dynamic loss scaling (run.precision=fp16) with one overflow decision for all workers. Keras checks a
    worker's own gradients, before the update and so before the allreduce Horovod's optimizer makes in it: a worker
    whose gradients alone overflowed skipped its update and its allreduce, and the others waited in theirs."""

    def check_finite(self, grads):
        import horovod.tensorflow as hvd

        overflowed = 1.0 - tf.cast(super().check_finite(grads), tf.float32)
        return tf.equal(hvd.allreduce(overflowed, op=hvd.Sum, name="loss_scale_overflow"), 0.0)


def augmented(dataset: tf.data.Dataset, augment, seed: int, positions: np.ndarray) -> tf.data.Dataset:
    """`augment(x, y, seed)` on each batch with the seed [seed, the batch's position]: the random draws of a batch
    depend only on where it is (so a resumed run draws what the uninterrupted one drew), not on a random state that
    a prefetching pipeline would have advanced by an unknown number of batches."""
    def with_seed(position, batch):
        x, y, *weights = batch
        return (*augment(x, y, tf.stack([tf.constant(seed, tf.int64), position])), *weights)

    positions_dataset = tf.data.Dataset.from_tensor_slices(positions.astype(np.int64))
    return tf.data.Dataset.zip(positions_dataset, dataset).map(with_seed, num_parallel_calls=tf.data.AUTOTUNE)


def _tf_dtype(values: np.ndarray) -> tf.DType:
    return tf.string if values.dtype == object else tf.as_dtype(values.dtype)


def train_micro_batch(model: keras.Model, batches: Any, unchanged: list) -> float:
    """The compiled train step on the next micro-batch, and its mean loss; the variables `unchanged` left as they
    were (BatchNorm's moving statistics, for a padding micro-batch: its example weighs 0 in the loss, not in them)."""
    kept = [keras.ops.convert_to_numpy(variable) for variable in unchanged]
    loss = float(model.train_function(batches)["loss"])
    for variable, value in zip(unchanged, kept, strict=True):
        variable.assign(value)
    return loss


def step_losses(running_means: list[float], sizes: list[int]) -> np.ndarray:
    """Each micro-batch's loss from the running means Keras reports after each one since its metrics were reset
    (means weighted by the micro-batches' sizes)."""
    counts = np.cumsum(sizes)
    return np.diff(np.asarray(running_means) * counts, prepend=0.0) / np.asarray(sizes)


class KerasEngine(Engine):
    init = staticmethod(dist.init_tf)
    elastic = "horovod.tensorflow.elastic"

    def __init__(self, recipe: Recipe, task, topology: dist.Topology, run_dir: Path, training: bool = True):
        self.train: BatchSource | StreamSource = task.train
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
        if recipe.optim.nonfinite == "skip":
            raise RecipeError("optim.nonfinite=skip needs the PyTorch engine; with Keras a non-finite loss stops the "
                              "run (optim.nonfinite=stop)")
        if recipe.dist.zero:
            raise RecipeError("dist.zero shards the training state on the PyTorch engine; the Keras engine keeps it "
                              "whole on every worker: set dist.zero=0")

    def _compile(self, recipe: Recipe) -> None:
        import horovod.tensorflow.keras as hvd_keras

        optim = recipe.optim
        self.micro_batches = self.feed.micro_batches(self.topo.size)
        factors = [self.lr_factor(step) for step in range(self.total_steps + 1)]
        self.schedule = TableSchedule(self.base_lr, factors, self.micro_batches)
        compression = hvd_keras.Compression.fp16 if recipe.dist.compression == "fp16" else hvd_keras.Compression.none
        self.distributed = hvd_keras.DistributedOptimizer(
            make_optimizer(optim, self.schedule), compression=compression,
            backward_passes_per_step=self.micro_batches, average_aggregated_gradients=True,
        )
        # Gradient accumulators even for one micro-batch a step (built, then left unused): a run resumed (or an
        # elastic one going on) with another number of workers has another number of micro-batches, and every
        # checkpoint and every worker then holds the same variables (Keras checkpoints an optimizer's variables by
        # their place in its list).
        self.distributed.gradient_accumulation_steps = self.micro_batches
        # What the model trains with, whose variables are broadcast, handed over and checkpointed: under fp16 the
        # loss scale's with the distributed optimizer's (compile would wrap it in Keras' own LossScaleOptimizer).
        self.optimizer = (AgreedLossScaleOptimizer(self.distributed, name="loss_scale_optimizer")
                          if recipe.run.precision == "fp16" else self.distributed)
        self.model.compile(optimizer=self.optimizer, loss=self.task.loss)
        self.optimizer.build(self.model.trainable_variables)
        self._accumulate(self.micro_batches)
        if not dist.is_elastic():  # (an elastic run hands rank 0's state to all when training starts)
            self._broadcast_from_root()
        self.model.make_train_function()  # model.train_function: one compiled step on the next batch
        self._stream: LiveIterator[Any] = LiveIterator()  # the epoch's pipeline, at (epoch, next step, rank, size)

    def _broadcast_from_root(self) -> None:
        """Collective: every rank takes rank 0's weights and optimizer state."""
        import horovod.tensorflow as hvd

        hvd.broadcast_variables(self.model.variables, root_rank=0)
        hvd.broadcast_variables(self.optimizer.variables, root_rank=0)

    # ---- training -------------------------------------------------------------------------------------
    def _open_epoch_at(self, first: int) -> Any:
        """This rank's micro-batches from global step `first` to the end of the epoch, as one tf.data pipeline."""
        dataset = self._indexed_epoch(first) if isinstance(self.train, BatchSource) else self._streamed_epoch(first)
        if self._augment is not None:  # the trainer's random augmentation, per batch
            seed = sharding.epoch_seed(self.recipe.run.seed, self.state.epoch)
            dataset = augmented(dataset, self._augment, seed, self._positions(first, self.steps_per_epoch - first))
        return iter(dataset.prefetch(tf.data.AUTOTUNE))

    def _step_layout(self) -> tuple[list[int], list[float]]:
        """The sizes of this worker's micro-batches in each step, and the weight of each one's examples' losses
        (see _weighted_micro_batches). A share smaller than the micro-batches (batch_size 1) has fewer; Keras'
        accumulation needs the same number on every worker, so the missing ones are one example of weight 0."""
        shares = sharding.rank_step_batches(np.arange(self.global_batch), 0, self.global_batch, self.topo.rank,
                                            self.topo.size, self.micro_batches)
        scale = self.topo.size * self.micro_batches / self.global_batch
        padding = self.micro_batches - len(shares)
        sizes = [len(share) for share in shares]
        return sizes + [1] * padding, [scale * size for size in sizes] + [0.0] * padding

    def _indexed_epoch(self, first: int) -> tf.data.Dataset:
        assert isinstance(self.train, BatchSource)
        sizes, weights = self._step_layout()
        steps = self.steps_per_epoch - first
        micro_batches: list[np.ndarray] = []
        for step in range(first, self.steps_per_epoch):
            parts = self.feed.rank_batches(self.state.epoch, step, self.topo)
            micro_batches += parts + [parts[0][:1]] * (len(sizes) - len(parts))
        self._sizes = collections.deque(sizes * steps)  # of the micro-batches not yet run
        batch = self.train.take(np.concatenate(micro_batches))
        if all(size * self.micro_batches * self.topo.size == self.global_batch for size in sizes):  # weights all 1
            return tf.data.Dataset.from_tensor_slices((batch["x"], batch["y"])).batch(sizes[0])
        return self._weighted_micro_batches(batch["x"], batch["y"], sizes * steps, weights * steps)

    def _streamed_epoch(self, first: int) -> tf.data.Dataset:
        """A StreamSource's micro-batches (padded and weighted as _step_layout says), turned into (x, y) by the
        task's `decode` in a parallel, order-keeping map."""
        assert isinstance(self.train, StreamSource)
        source, epoch, (names, signature, decoded_specs) = self.train, self.state.epoch, self._stream_signature
        sizes, weights = self._step_layout()
        self._sizes = collections.deque(sizes * (self.steps_per_epoch - first))

        def weighted_micro_batches():
            for step in source.rank_steps(epoch, first, self.global_batch, self.topo.rank, self.topo.size,
                                          self.micro_batches):
                padded = step + [{k: v[:1] for k, v in step[0].items()}] * (len(sizes) - len(step))
                for columns, weight in zip(padded, weights, strict=True):
                    yield (*(columns[n] for n in names), np.full(len(columns[names[0]]), weight, np.float32))

        decode = self._decode

        def decoded(*tensors):
            *columns, weight = tensors
            x, y = tf.numpy_function(lambda *arrays: decode(dict(zip(names, arrays, strict=True))), columns,
                                     [spec.dtype for spec in decoded_specs])
            return tf.ensure_shape(x, decoded_specs[0].shape), tf.ensure_shape(y, decoded_specs[1].shape), weight

        dataset = tf.data.Dataset.from_generator(weighted_micro_batches, output_signature=signature)
        return dataset.map(decoded, num_parallel_calls=tf.data.AUTOTUNE)

    @functools.cached_property
    def _decode(self) -> Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
        """A streamed split's micro-batch columns -> numpy (x, y): the task's `decode`, or its x and y columns."""
        return getattr(self.task, "decode", None) or (lambda columns: (columns["x"], columns["y"]))

    @functools.cached_property
    def _stream_signature(self) -> tuple[list[str], tuple[tf.TensorSpec, ...], tuple[tf.TensorSpec, ...]]:
        """A streamed split's column names, the tf.data signature of its weighted micro-batches, and that of the
        decoded (x, y): read from this worker's first micro-batch (once; only its own chunks)."""
        assert isinstance(self.train, StreamSource)
        columns = next(iter(self.train.rank_steps(0, 0, self.global_batch, self.topo.rank, self.topo.size,
                                                  self.micro_batches)))[0]
        names = list(columns)
        signature = (*(tf.TensorSpec((None, *columns[n].shape[1:]), _tf_dtype(columns[n])) for n in names),
                     tf.TensorSpec((None,), tf.float32))
        decoded = tuple(tf.TensorSpec((None, *a.shape[1:]), tf.as_dtype(a.dtype)) for a in self._decode(columns))
        return names, signature, decoded

    def _positions(self, first: int, count: int) -> np.ndarray:
        """This worker's micro-batches' positions in the epoch (sharding.micro_batch_positions), in order."""
        return sharding.micro_batch_positions(first, count, self.micro_batches, self.topo.rank, self.topo.size).ravel()

    def _seed_dropout(self, position: int) -> None:
        """Dropout's masks (any random layer's draws) for the micro-batch at `position`: each layer's seed generator
        set to its seed for the epoch and the position (room for 2**20 draws a micro-batch)."""
        for layer, state in enumerate(self._random_state()):
            state.assign([sharding.epoch_seed(self.recipe.run.seed, self.state.epoch, 1 + layer), position << 20])

    @staticmethod
    def _weighted_micro_batches(x: np.ndarray, y: np.ndarray, sizes: list[int], weights: list[float]
                                ) -> tf.data.Dataset:
        """Micro-batches of different sizes (workers that do not divide the global batch), each example's loss
        weighted by workers x micro-batches x micro-batch size / global batch: Keras averages a micro-batch's losses,
        then the micro-batches, and Horovod the workers, so the allreduced gradient is the global batch's mean."""
        ends = np.cumsum(sizes)

        def micro_batch_slices():
            for end, size, weight in zip(ends, sizes, weights, strict=True):
                yield x[end - size : end], y[end - size : end], np.full(size, weight, np.float32)

        return tf.data.Dataset.from_generator(micro_batch_slices, output_signature=(
            tf.TensorSpec((None, *x.shape[1:]), tf.as_dtype(x.dtype)),
            tf.TensorSpec((None, *y.shape[1:]), tf.as_dtype(y.dtype)),
            tf.TensorSpec((None,), tf.float32)))

    def run_steps(self, first: int, count: int) -> list[float]:
        position = (self.state.epoch, first, self.topo.rank, self.topo.size)
        batches = self._stream.at(position, lambda: self._open_epoch_at(first))
        self.model.reset_metrics()
        runs = count * self.micro_batches
        # Keras counts micro-batches (`iterations` is this counter // gradient_accumulation_steps): the steps done, in
        # this worker's micro-batches (a restored or handed-over state may come from another number of workers).
        self.distributed._iterations.assign(self.state.step * self.micro_batches)
        statistics, (_, weights) = self._statistic_weights(), self._step_layout()
        means = []
        for position, weight in zip(self._positions(first, count), weights * count, strict=True):
            self._seed_dropout(int(position))
            means.append(train_micro_batch(self.model, batches, statistics if weight == 0.0 else []))
        self._stream.reached((self.state.epoch, first + count, self.topo.rank, self.topo.size))
        losses = step_losses(means, [self._sizes.popleft() for _ in range(runs)])
        return np.mean(np.reshape(losses, (count, self.micro_batches)), axis=1).tolist()

    def _statistic_weights(self) -> list:
        return [w for w in self.model.non_trainable_weights if w.dtype.startswith("float")]

    def statistics(self) -> list:
        return [w.value for w in self._statistic_weights()]

    def assign_statistics(self, values: list) -> None:
        for weight, value in zip(self._statistic_weights(), values, strict=True):
            weight.assign(value)

    def current_lr(self) -> float:
        return self.base_lr * self.lr_factor(self.state.step)  # (what the schedule gives the next update)

    def predict_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.task.predict(self.model, batch).items()}

    def weights_arrays(self) -> Iterator[np.ndarray]:
        for variable in self.model.weights:
            yield np.asarray(variable)

    def snapshot_weights(self) -> list[np.ndarray]:
        return [np.array(variable) for variable in self.model.weights]

    def load_snapshot(self, weights: list[np.ndarray]) -> None:
        for variable, value in zip(self.model.weights, weights, strict=True):
            variable.assign(value)

    def parameter_bytes(self) -> dict[str, int]:
        return {"parameters": sum(np.asarray(v).nbytes for v in self.model.weights), "sharded": 0}

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)

    def _random_state(self) -> list:
        """The seed generators' states of dropout (and any random layer): integer variables of the model."""
        return [v for v in self.model.non_trainable_variables if not v.dtype.startswith("float")]

    def write_state(self, folder: Path, gathered: None) -> None:
        self._checkpoint().write(str(folder / TF_STATE))

    def restore_state(self, checkpoint: Path | None) -> None:
        """Rank 0 reads the checkpoint; every rank then takes rank 0's variables."""
        dist.on_root(lambda: self.load_checkpoint(checkpoint))
        self._broadcast_from_root()

    def _accumulate(self, micro_batches: int) -> None:
        """Keras' gradient accumulation over this many micro-batches a step; none for one (its train step would
        otherwise run the update in a conditional every micro-batch)."""
        self.distributed.gradient_accumulation_steps = micro_batches if micro_batches > 1 else None

    def load_checkpoint(self, checkpoint: Path | None) -> None:
        assert checkpoint is not None, "rank 0 gets the checkpoint's path"
        try:
            self._checkpoint().read(str(checkpoint / TF_STATE)).assert_existing_objects_matched()
        except (tf.errors.OpError, AssertionError, ValueError) as e:
            raise CheckpointError(f"cannot restore {checkpoint}: {e}") from None

    def load_exported(self, model_dir: Path) -> None:
        try:
            self.model.load_weights(str(model_dir / KERAS_WEIGHTS))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load weights from {model_dir / KERAS_WEIGHTS}: {e}") from None

    # ---- elastic training -----------------------------------------------------------------------------
    def _elastic_variables(self) -> list:
        """What an elastic worker hands over: the model's and the optimizer's variables."""
        return list(self.model.variables) + list(self.optimizer.variables)

    def modules_state_dict(self) -> dict:
        return {"variables": [np.array(v) for v in self._elastic_variables()]}

    def load_modules_state_dict(self, state: dict) -> None:
        for variable, value in zip(self._elastic_variables(), state["variables"], strict=True):
            variable.assign(value)

    def resized(self, topology: dist.Topology) -> None:
        super().resized(topology)
        micro_batches = self.feed.micro_batches(topology.size)
        if micro_batches != self.micro_batches:  # traced again with the new number
            self.micro_batches = micro_batches
            self._accumulate(micro_batches)
            # (a new schedule: the optimizer holds a copy of the first, which Horovod's wrapper made from its config)
            self.schedule = TableSchedule(self.base_lr, self.schedule.factors, micro_batches)
            self.optimizer.learning_rate = self.schedule
            self.model.make_train_function(force=True)


def save_weights(model: keras.Model, model_dir: Path) -> None:
    """The exported weights every Keras trainer writes (and `ddl eval` reads)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(model_dir / KERAS_WEIGHTS))


__all__ = ["ColumnSource", "KerasEngine", "MODEL_DIR", "save_weights"]
