"""Issue 32: pieces of the Keras engine, in one process."""

import keras
import numpy as np
import tensorflow as tf

from ddl_apps.core.tf_engine import train_micro_batch

value_of = keras.ops.convert_to_numpy


def test_a_padding_micro_batch_leaves_batchnorm_statistics_alone():
    """A worker whose share of a step is smaller than its micro-batches runs padding ones (an example weighted 0):
    they train nothing and must not move BatchNorm's moving statistics either, which Keras updates in the forward
    pass whatever the examples' weights."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(momentum=0.5),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.make_train_function()
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    batches = iter(tf.data.Dataset.from_tensor_slices(
        (x, np.ones((4, 1), np.float32), np.array([1, 1, 0, 0], np.float32))).batch(2))
    statistics = list(model.non_trainable_weights)
    before = [value_of(w) for w in statistics]
    train_micro_batch(model, batches, [])  # a real micro-batch moves them
    moved = [value_of(w) for w in statistics]
    assert all(not np.array_equal(a, b) for a, b in zip(before, moved, strict=True))
    weights = [value_of(w) for w in model.trainable_weights]
    train_micro_batch(model, batches, statistics)  # the padding one (weight 0) leaves them, and trains nothing
    for variable, value in zip(statistics, moved, strict=True):
        np.testing.assert_array_equal(value_of(variable), value)
    for variable, value in zip(model.trainable_weights, weights, strict=True):
        np.testing.assert_allclose(value_of(variable), value, rtol=0, atol=1e-7)
