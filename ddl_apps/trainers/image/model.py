"""A small ResNet in Keras 3 with BatchNormalization. Each rank normalises with its own batch's statistics
(as PyTorch DDP does without SyncBN); the Keras engine averages the moving statistics across ranks after every
chunk of steps, so all ranks hold the same weights."""

from __future__ import annotations

import keras
from keras import layers


def _norm() -> layers.Layer:
    return layers.BatchNormalization(momentum=0.9)


def residual_block(x, filters: int, stride: int):
    shortcut = x
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    x = layers.ReLU()(_norm()(x))
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    x = _norm()(x)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = _norm()(layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut))
    return layers.ReLU()(layers.Add()([x, shortcut]))


def small_resnet(input_shape: tuple[int, int, int], classes: int, width: int, blocks: list[int],
                 dropout: float) -> keras.Model:
    inputs = keras.Input(input_shape)
    x = layers.ReLU()(_norm()(layers.Conv2D(width, 3, padding="same", use_bias=False)(inputs)))
    for stage, count in enumerate(blocks):
        for block in range(count):
            x = residual_block(x, width * 2**stage, stride=2 if stage > 0 and block == 0 else 1)
    x = layers.Dropout(dropout)(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, layers.Dense(classes, activation="softmax")(x), name="small_resnet")
