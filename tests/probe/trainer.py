"""Digits (8x8 images, 10 classes) with a two-layer MLP; no dropout, so runs are exactly comparable."""

from pathlib import Path

import numpy as np
import torch

from ddl_apps.core import torch_engine
from ddl_apps.core.rundir import MODEL_WEIGHTS
from ddl_apps.core.torch_engine import TensorSource, save_weights

ENGINE = torch_engine


class DigitsTask:
    def __init__(self, recipe):
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.int64)
        n = recipe.data.train_examples
        self.hidden = recipe.model.hidden
        self.train = TensorSource(x=x[:n], y=y[:n])
        self.valid = TensorSource(x=x[n:], y=y[n:])
        self.test = None

    def build_model(self):
        return torch.nn.Sequential(torch.nn.Linear(64, self.hidden), torch.nn.Tanh(), torch.nn.Linear(self.hidden, 10))

    def loss(self, model, batch):
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])

    def predict(self, model, batch):
        return {"pred": model(batch["x"]).argmax(1), "y": batch["y"]}

    def metrics(self, outputs):
        return {"accuracy": float(np.mean(outputs["pred"] == outputs["y"])), "examples": float(len(outputs["y"]))}

    def export(self, model, model_dir: Path):
        model_dir.mkdir(parents=True, exist_ok=True)
        save_weights(model, model_dir / MODEL_WEIGHTS)

    def report(self):
        return {}


def build_task(recipe, topology):
    return DigitsTask(recipe)
