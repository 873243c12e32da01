"""The digits probe in Keras 3: the same data, model and metrics as tests/probe."""

from pathlib import Path

import keras
import numpy as np

from ddl_apps.core.contract import KerasTask, TrainerHooks
from ddl_apps.core.tf_engine import save_weights
from tests.probe.data import DigitsTask


class KerasDigitsTask(DigitsTask, KerasTask):
    loss = "sparse_categorical_crossentropy"

    def build_model(self):
        return keras.Sequential([keras.Input((64,)), keras.layers.Dense(self.hidden, activation="tanh"),
                                 keras.layers.Dense(10, activation="softmax")])

    def predict(self, model, batch):
        return {"pred": np.argmax(model(batch["x"], training=False), axis=1), "y": batch["y"]}

    def export(self, model, model_dir: Path):
        save_weights(model, model_dir)


def build_task(recipe, topology):
    return KerasDigitsTask(recipe)


HOOKS = TrainerHooks(build_task=build_task)
