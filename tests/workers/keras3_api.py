"""Run under horovodrun -np 2: Horovod's TensorFlow and Keras APIs on Keras 3.

Every check compares against values computed in this process without Horovod, or across ranks with
allgather; any mismatch raises (non-zero exit). Prints one 'ok <check>' line per passing check on rank 0.
"""

import sys
import warnings

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


class RecordLearningRate(keras.callbacks.Callback):
    """The optimizer's learning rate as each batch starts and as each epoch ends."""

    def __init__(self):
        super().__init__()
        self.per_batch, self.per_epoch = [], []

    def learning_rate(self):
        return float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_train_batch_begin(self, batch, logs=None):
        self.per_batch.append(self.learning_rate())

    def on_epoch_end(self, epoch, logs=None):
        self.per_epoch.append(self.learning_rate())


def check_callbacks():
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


def check_groups():
    """DistributedOptimizer(groups=...): a number of groups, and a list of groups matched to the gradients by the
    variables' paths (every Dense layer's kernel is named 'kernel'), allreduce what no grouping does."""
    for label in ("groups=2", "groups as a list"):
        model = make_model(seed=0)
        groups = 2 if label == "groups=2" else [list(model.layers[0].trainable_variables), [model.layers[1].kernel]]
        model.compile(optimizer=hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.1), groups=groups), loss="mse")
        model.fit(X[:, mine].reshape(-1, FEATURES), Y[:, mine].reshape(-1, 1), batch_size=PER_RANK, epochs=1,
                  shuffle=False, verbose=0)
        deviation = np.abs(flat(model.trainable_variables) - REFERENCE).max()
        assert deviation < 1e-6, f"DistributedOptimizer {label}: deviates from one process by {deviation}"
        ok(f"DistributedOptimizer {label} deviation {deviation:.1e}")


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
    # After Masking, the statistics leave the masked steps out, as Keras' BatchNormalization does (the same data on
    # every rank, so the combined batch's statistics are each rank's).
    steps = np.zeros((2, 4, 3), np.float32)
    steps[:, :2] = [[[1, 2, 3], [5, 4, 3]], [[2, 3, 4], [4, 3, 2]]]
    means = []
    for normalization in (hvd.SyncBatchNormalization(momentum=0.0), keras.layers.BatchNormalization(momentum=0.0)):
        inputs = keras.Input((4, 3))
        keras.Model(inputs, normalization(keras.layers.Masking(0.0)(inputs)))(steps, training=True)
        means.append(keras.ops.convert_to_numpy(normalization.moving_mean))
    np.testing.assert_allclose(means[0], means[1], rtol=1e-6)
    np.testing.assert_allclose(means[0], [3.0, 3.0, 3.0], rtol=1e-6)
    ok("SyncBatchNormalization leaves masked steps out of its statistics")


def own_and_averaged_gradients(model, x, y):
    """This rank's gradients of the mean squared error on its batch (no Horovod), and their mean over ranks."""
    with tf.GradientTape() as tape:
        loss = keras.ops.mean((model(x) - y) ** 2)
    own = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
    return own, [hvd.allreduce(tf.constant(g), op=hvd.Average).numpy() for g in own]


def check_local_variables():
    """Local variables are neither broadcast nor allreduced: each worker keeps its own, updated with its own
    gradient (divided by the number of workers when scale_local_gradients, as Horovod documents)."""
    model = make_model(seed=rank)
    own_init = [v.numpy() for v in model.layers[1].variables]
    model.compile(optimizer=hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.0)), loss="mse")
    callback = hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0, local_variables=model.layers[1].variables)
    model.fit(X[0, mine], Y[0, mine], batch_size=PER_RANK, epochs=1, verbose=0, callbacks=[callback])
    assert_same_on_all_ranks(flat(model.layers[0].variables), "broadcast layer")
    for variable, initial in zip(model.layers[1].variables, own_init, strict=True):
        assert np.array_equal(variable.numpy(), initial), "a local variable was broadcast"
    ok("BroadcastGlobalVariablesCallback leaves local_variables alone")

    import horovod.keras as hvd_standalone_keras

    for label, make_optimizer in [
        ("tensorflow.keras.PartialDistributedOptimizer", lambda model, scale: hvd_keras.PartialDistributedOptimizer(
            keras.optimizers.SGD(0.1), local_layers=[model.layers[1]], scale_local_gradients=scale)),
        ("keras.PartialDistributedOptimizer", lambda model, scale: hvd_standalone_keras.PartialDistributedOptimizer(
            keras.optimizers.SGD(0.1), local_layers=model.layers[1], scale_local_gradients=scale)),
        ("DistributedOptimizer.register_local_var", lambda model, scale: register_layer(
            hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.1), scale_local_gradients=scale), model.layers[1])),
    ]:
        for scale in (True, False):
            model = make_model(seed=0)
            initial = [v.numpy() for v in model.trainable_variables]
            own, averaged = own_and_averaged_gradients(model, X[0, mine], Y[0, mine])
            model.compile(optimizer=make_optimizer(model, scale), loss="mse")
            model.fit(X[0, mine], Y[0, mine], batch_size=PER_RANK, epochs=1, shuffle=False, verbose=0)
            local = {id(v) for v in model.layers[1].trainable_variables}
            for variable, start, mine_g, mean_g in zip(model.trainable_variables, initial, own, averaged, strict=True):
                gradient = (mine_g / (size if scale else 1)) if id(variable) in local else mean_g
                np.testing.assert_allclose(variable.numpy(), start - 0.1 * gradient, rtol=1e-5, atol=1e-6,
                                           err_msg=f"{label} scale_local_gradients={scale}")
            assert_same_on_all_ranks(flat(model.layers[0].variables), label)
        ok(f"{label}: local gradients are each worker's own (scaled and not), the others averaged")


def register_layer(optimizer, layer):
    for variable in layer.trainable_weights:
        optimizer.register_local_var(variable)
    return optimizer


def check_sparse_as_dense():
    """An Embedding's gradients are IndexedSlices: allgathered, or allreduced as dense with sparse_as_dense; both
    give one process's update on the combined batch."""
    ids = np.random.default_rng(1).integers(0, 20, size=(PER_RANK * size, 3))
    targets = Y[0, :, :1]

    def embedding_model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(20, 4),
                                 keras.layers.Flatten(), keras.layers.Dense(1)])

    reference = embedding_model()
    reference.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    reference.fit(ids, targets, batch_size=len(ids), epochs=2, shuffle=False, verbose=0)
    for sparse_as_dense in (True, False):
        model = embedding_model()
        model.compile(optimizer=hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.5),
                                                               sparse_as_dense=sparse_as_dense), loss="mse")
        model.fit(ids[mine], targets[mine], batch_size=PER_RANK, epochs=2, shuffle=False, verbose=0)
        deviation = np.abs(flat(model.trainable_variables) - flat(reference.trainable_variables)).max()
        assert deviation < 1e-6, f"Embedding sparse_as_dense={sparse_as_dense}: deviates by {deviation}"
        ok(f"Embedding gradients sparse_as_dense={sparse_as_dense} deviation {deviation:.1e}")


def check_learning_rate_schedule():
    """LearningRateScheduleCallback sets initial_lr x multiplier(epoch) from start_epoch to end_epoch, per epoch
    (staircase) or per batch in fractional epochs. Momentum correction (the default) cannot apply to a Keras 3
    optimizer: a warning says so."""
    for staircase in (True, False):
        recorder = RecordLearningRate()
        schedule = hvd_keras.callbacks.LearningRateScheduleCallback(
            initial_lr=0.1, multiplier=lambda epoch: 0.5 ** epoch, start_epoch=1, end_epoch=3,
            staircase=staircase, steps_per_epoch=STEPS)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit_model(hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9)),
                      [hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0), schedule, recorder], epochs=4)
        assert any("momentum correction is not applied" in str(w.message) for w in caught), caught
        epochs = np.repeat(np.arange(4), STEPS) + (0 if staircase else np.tile(np.arange(STEPS) / STEPS, 4))
        expected = np.where((epochs >= 1) & (epochs < 3), 0.1 * 0.5 ** epochs, np.nan)
        scheduled = ~np.isnan(expected)
        np.testing.assert_allclose(np.array(recorder.per_batch)[scheduled], expected[scheduled], rtol=1e-6)
        assert recorder.per_batch[0] == np.float32(0.1), recorder.per_batch
        ok(f"LearningRateScheduleCallback staircase={staircase}, warning that momentum correction is not applied")


def check_elastic_state():
    """hvd.elastic.KerasState with the elastic callbacks under hvd.elastic.run: the first sync hands rank 0's
    weights to all, training matches one process, commit / restore go back to the committed weights, optimizer
    state and counters, and sync hands rank 0's committed state to every worker."""
    model = make_model(seed=rank)
    optimizer = hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.0))
    model.compile(optimizer=optimizer, loss="mse")
    state = hvd_keras.elastic.KerasState(model, batch=0, epoch=0)
    callbacks = [hvd_keras.elastic.CommitStateCallback(state, batches_per_commit=2),
                 hvd_keras.elastic.UpdateBatchStateCallback(state),
                 hvd_keras.elastic.UpdateEpochStateCallback(state)]
    seen_batches = []
    callbacks.append(keras.callbacks.LambdaCallback(on_batch_end=lambda batch, logs: seen_batches.append(
        (state.epoch, state.batch))))

    @hvd_keras.elastic.run
    def train(state):
        model.fit(X[:, mine].reshape(-1, FEATURES), Y[:, mine].reshape(-1, 1), batch_size=PER_RANK,
                  epochs=1 - state.epoch, shuffle=False, verbose=0, callbacks=callbacks)
        return "trained"

    assert train(state) == "trained"
    deviation = np.abs(flat(model.trainable_variables) - REFERENCE).max()
    assert deviation < 1e-6, f"KerasState training deviates from one process by {deviation}"
    assert (state.epoch, state.batch) == (1, 0) and seen_batches == [(0, b) for b in range(STEPS)], seen_batches
    ok("KerasState: hvd.elastic.run trains from rank 0's weights, callbacks keep batch and epoch")

    committed = flat(model.variables), flat(optimizer.variables)
    state.commit()
    model.fit(X[0, mine], Y[0, mine], batch_size=PER_RANK, epochs=1, verbose=0)
    state.epoch = 7
    assert not np.array_equal(flat(model.variables), committed[0])
    state.restore()
    assert np.array_equal(flat(model.variables), committed[0]) and np.array_equal(flat(optimizer.variables),
                                                                                  committed[1])
    assert state.epoch == 1
    ok("KerasState: restore goes back to the committed weights, optimizer variables and counters")

    if rank != 0:  # a worker whose state wandered off: sync hands it rank 0's
        model.layers[0].kernel.assign(np.zeros(model.layers[0].kernel.shape, np.float32))
        state.epoch = 99
    state.sync()
    assert_same_on_all_ranks(np.concatenate([flat(model.variables), flat(optimizer.variables), [state.epoch]]),
                             "KerasState.sync")
    assert state.epoch == 1
    ok("KerasState: sync hands rank 0's state to every worker")

    @hvd_keras.elastic.run
    def fails(state):
        raise tf.errors.UnknownError(None, None, "not a Horovod collective")

    try:
        fails(state)
    except tf.errors.UnknownError:
        ok("hvd.elastic.run raises errors that are not Horovod's")
    else:
        raise AssertionError("hvd.elastic.run swallowed an error")


for check in sys.argv[1:] or ["broadcast_variables", "gradient_tape", "keras_distributed_optimizer", "groups",
                              "callbacks", "sync_batch_norm", "local_variables", "sparse_as_dense",
                              "learning_rate_schedule", "elastic_state"]:
    globals()[f"check_{check}"]()
if rank == 0:
    print("all keras3 checks passed", flush=True)
