"""Digits (8x8 images, 10 classes) with a two-layer MLP; no dropout, so runs are exactly comparable."""

from pathlib import Path

import torch

from ddl_apps.core.contract import TorchTask, TrainerHooks
from ddl_apps.core.torch_engine import save_weights
from tests.probe.data import DigitsTask


class TorchDigitsTask(DigitsTask, TorchTask):
    def __init__(self, recipe):
        super().__init__(recipe, torch.from_numpy)

    def build_model(self):
        return torch.nn.Sequential(torch.nn.Linear(64, self.hidden), torch.nn.Tanh(), torch.nn.Linear(self.hidden, 10))

    def loss(self, model, batch):
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])

    def predict(self, model, batch):
        return {"pred": model(batch["x"]).argmax(1), "y": batch["y"]}

    def export(self, model, model_dir: Path):
        save_weights(model, model_dir)


def build_task(recipe, topology):
    return TorchDigitsTask(recipe)


HOOKS = TrainerHooks(build_task=build_task)
