"""Run under horovodrun -np 2: Horovod's TensorFlow and Keras APIs on Keras 3.

Every check compares against values computed in this process without Horovod, or across ranks with
allgather; any mismatch raises (non-zero exit). Prints one 'ok <check>' line per passing check on rank 0.
"""

import sys

import horovod.tensorflow as hvd
import horovod.tensorflow.keras as hvd_keras
import keras
import numpy as np
import tensorflow as tf

hvd.init()
rank, size = hvd.rank(), hvd.size()
PER_RANK, FEATURES, STEPS = 8, 5, 4
rng = np.random.default_rng(0)  # same data on every rank, on purpose
X = rng.normal(size=(STEPS, PER_RANK * size, FEATURES)).astype("float32")
Y = rng.normal(size=(STEPS, PER_RANK * size, 1)).astype("float32")
mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)


def ok(check):
    if rank == 0:
        print(f"ok {check}", flush=True)


def make_model(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1)])
    return model


def flat(variables):
    return np.concatenate([np.ravel(keras.ops.convert_to_numpy(v)) for v in variables])


def assert_same_on_all_ranks(values, what):
    gathered = hvd.allgather(tf.constant(values[None])).numpy()
    for r in range(size):
        if not np.array_equal(gathered[0], gathered[r]):
            raise AssertionError(f"{what}: rank {r} differs from rank 0")


def single_process_reference(batches):
    """What the weights should be: one process, plain Keras SGD over the combined batches."""
    model = make_model(seed=0)
    optimizer = keras.optimizers.SGD(0.1)
    for x, y in batches:
        with tf.GradientTape() as tape:
            loss = keras.ops.mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    return flat(model.trainable_variables)


REFERENCE = single_process_reference(zip(X, Y, strict=True))


def check_broadcast_variables():
    model = make_model(seed=rank)  # different initial weights per rank
    hvd.broadcast_variables(model.variables, root_rank=0)
    assert_same_on_all_ranks(flat(model.variables), "eager broadcast_variables")
    if rank == 0:
        expected = flat(model.variables)
    model = make_model(seed=100 + rank)

    @tf.function
    def broadcast():
        hvd.broadcast_variables(model.variables, root_rank=0)

    broadcast()
    assert_same_on_all_ranks(flat(model.variables), "tf.function broadcast_variables")
    if rank == 0:
        assert not np.array_equal(flat(model.variables), expected)
    ok("broadcast_variables eager and tf.function")


def train_with_tape(wrap, compiled, steps=STEPS):
    model = make_model(seed=0)
    optimizer = keras.optimizers.SGD(0.1)

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = keras.ops.mean((model(x) - y) ** 2)
        tape = wrap(tape, model)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    step = tf.function(step) if compiled else step
    for s in range(steps):
        step(tf.constant(X[s, mine]), tf.constant(Y[s, mine]))
    return model


def check_gradient_tape():
    for compiled in (False, True):
        for label, wrap, tolerance in [
            ("DistributedGradientTape", lambda t, m: hvd.DistributedGradientTape(t), 1e-6),
            ("DistributedGradientTape fp16", lambda t, m: hvd.DistributedGradientTape(
                t, compression=hvd.Compression.fp16), 1e-2),
            ("PartialDistributedGradientTape", lambda t, m: hvd.PartialDistributedGradientTape(t), 1e-6),
        ]:
            weights = flat(train_with_tape(wrap, compiled).trainable_variables)
            assert_same_on_all_ranks(weights, label)
            deviation = np.abs(weights - REFERENCE).max()
            assert deviation < tolerance, f"{label}: deviates from one process by {deviation}"
            ok(f"{label} ({'tf.function' if compiled else 'eager'}) deviation {deviation:.1e}")
    # A local layer keeps its own gradients: the shared layer matches across ranks, the local one does not.
    model = train_with_tape(lambda t, m: hvd.PartialDistributedGradientTape(t, local_layers=[m.layers[1]]), True)
    assert_same_on_all_ranks(flat(model.layers[0].trainable_variables), "shared layer")
    gathered = hvd.allgather(tf.constant(flat(model.layers[1].trainable_variables)[None])).numpy()
    assert not np.array_equal(gathered[0], gathered[1]), "local layer should differ across ranks"
    ok("PartialDistributedGradientTape local_layers")


def fit_model(optimizer, callbacks, epochs=1, data=(X, Y), steps=STEPS):
    model = make_model(seed=rank)  # the broadcast callback must make these equal
    model.compile(optimizer=optimizer, loss="mse", metrics=["mae"])
    x = data[0][:steps, mine].reshape(-1, FEATURES)
    y = data[1][:steps, mine].reshape(-1, 1)
    history = model.fit(x, y, batch_size=PER_RANK, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    return model, history


def check_keras_distributed_optimizer():
    for label, compression, tolerance in [("fp32", hvd.Compression.none, 1e-6), ("fp16", hvd.Compression.fp16, 1e-2)]:
        optimizer = hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.1), compression=compression)
        model, _ = fit_model(optimizer, [hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0)])
        weights = flat(model.trainable_variables)
        assert_same_on_all_ranks(weights, f"model.fit {label}")
        deviation = np.abs(weights - REFERENCE).max()
        assert deviation < tolerance, f"model.fit {label}: deviates from one process by {deviation}"
        ok(f"model.fit DistributedOptimizer {label} deviation {deviation:.1e}")

    # backward_passes_per_step=2 over 4 micro-batches == 2 steps on the doubled batch (average of the two).
    optimizer = hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.1), backward_passes_per_step=2,
                                               average_aggregated_gradients=True)
    model, _ = fit_model(optimizer, [hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0)])
    weights = flat(model.trainable_variables)
    assert_same_on_all_ranks(weights, "backward_passes_per_step")
    doubled = [(np.concatenate(X[i : i + 2]), np.concatenate(Y[i : i + 2])) for i in (0, 2)]
    deviation = np.abs(weights - single_process_reference(doubled)).max()
    assert deviation < 1e-6, f"backward_passes_per_step: deviates by {deviation}"
    ok(f"model.fit backward_passes_per_step=2 deviation {deviation:.1e}")

    for base in (keras.optimizers.Adam(1e-3), keras.optimizers.AdamW(1e-3), keras.optimizers.RMSprop(1e-3)):
        model, _ = fit_model(hvd_keras.DistributedOptimizer(base),
                             [hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0)])
        assert_same_on_all_ranks(flat(model.trainable_variables), type(base).__name__)
    ok("DistributedOptimizer wraps Adam, AdamW, RMSprop")


def check_callbacks():
    class RecordLearningRate(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.per_epoch = []

        def on_epoch_end(self, epoch, logs=None):
            self.per_epoch.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    scaled_lr, warmup_epochs = 0.01 * size, 2
    recorder = RecordLearningRate()
    optimizer = hvd_keras.DistributedOptimizer(keras.optimizers.SGD(scaled_lr, momentum=0.9))
    callbacks = [
        hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0),
        hvd_keras.callbacks.MetricAverageCallback(),
        hvd_keras.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=warmup_epochs,
                                                       steps_per_epoch=STEPS),
        recorder,
    ]
    model, history = fit_model(optimizer, callbacks, epochs=3)
    assert_same_on_all_ranks(flat(model.trainable_variables), "callbacks run")
    lrs = recorder.per_epoch
    assert lrs[0] < scaled_lr and abs(lrs[warmup_epochs - 1] - scaled_lr) < 1e-6, lrs
    ok(f"LearningRateWarmupCallback reaches {scaled_lr} at epoch {warmup_epochs}: {lrs}")

    # MetricAverageCallback: logged loss equals the mean of the ranks' own losses.
    local_model, local_history = fit_model(hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.01)),
                                           [hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0)])
    own = np.array([local_history.history["loss"][-1]], dtype=np.float64)
    mean = hvd.allreduce(tf.constant(own), op=hvd.Average).numpy()[0]
    _, averaged = fit_model(hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.01)),
                            [hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0),
                             hvd_keras.callbacks.MetricAverageCallback()])
    logged = averaged.history["loss"][-1]
    assert abs(logged - mean) < 1e-5 * max(1, abs(mean)), (logged, mean)
    assert_same_on_all_ranks(np.array([logged]), "averaged metric")
    ok("MetricAverageCallback logs the mean of the ranks' metrics")


def check_sync_batch_norm():
    layer = hvd.SyncBatchNormalization(axis=-1, momentum=0.0, epsilon=0.0, center=False, scale=False)
    data = rng.normal(size=(PER_RANK * size, 3)).astype("float32") * 3 + 1
    out = layer(tf.constant(data[mine]), training=True).numpy()
    mean, var = data.mean(0), data.var(0)
    np.testing.assert_allclose(out, (data[mine] - mean) / np.sqrt(var), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.moving_mean), mean, rtol=1e-5, atol=1e-5)
    ok("SyncBatchNormalization uses the statistics of the combined batch")
    stacked = keras.Sequential([keras.Input((3,)), hvd.SyncBatchNormalization(), hvd.SyncBatchNormalization()])
    assert len({layer.name for layer in stacked.layers}) == 2
    ok("SyncBatchNormalization layers get unique names")


for check in sys.argv[1:] or ["broadcast_variables", "gradient_tape", "keras_distributed_optimizer",
                              "callbacks", "sync_batch_norm"]:
    globals()[f"check_{check}"]()
if rank == 0:
    print("all keras3 checks passed", flush=True)
