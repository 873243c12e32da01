"""Digits (8x8 images, 10 classes) with a two-layer Keras MLP; no dropout, so runs are exactly comparable."""

from pathlib import Path

import keras
import numpy as np

from ddl_apps.core import tf_engine
from ddl_apps.core.tf_engine import ArraySource, save_weights

ENGINE = tf_engine


class DigitsTask:
    loss = "sparse_categorical_crossentropy"

    def __init__(self, recipe):
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype("float32")
        n = recipe.data.train_examples
        self.hidden = recipe.model.hidden
        self.train = ArraySource(x=x[:n], y=y[:n])
        self.valid = ArraySource(x=x[n:], y=y[n:])
        self.test = None

    def build_model(self):
        return keras.Sequential([keras.Input((64,)), keras.layers.Dense(self.hidden, activation="tanh"),
                                 keras.layers.Dense(10, activation="softmax")])

    def predict(self, model, batch):
        return {"pred": np.argmax(model(batch["x"], training=False), axis=1), "y": batch["y"]}

    def metrics(self, outputs):
        return {"accuracy": float(np.mean(outputs["pred"] == outputs["y"])), "examples": float(len(outputs["y"]))}

    def export(self, model, model_dir: Path):
        save_weights(model, model_dir)

    def report(self):
        return {}


def build_task(recipe, topology):
    return DigitsTask(recipe)
