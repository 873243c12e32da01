"""What training and `ddl predict` call: the toy task on the PyTorch engine."""

import json
from pathlib import Path

import numpy as np
import torch

from ddl_apps.core.contract import TorchTask, TrainerHooks
from ddl_apps.core.dist import Topology
from ddl_apps.core.torch_engine import ColumnSource, load_weights, save_weights
from ddl_apps.recipe import Recipe


class ToyTask(TorchTask):
    def __init__(self, recipe: Recipe):
        data = recipe.data
        rng = np.random.default_rng(recipe.run.seed)
        self.weights = rng.normal(size=data.features).astype(np.float32)
        x = rng.normal(size=(data.examples, data.features)).astype(np.float32)
        y = x @ self.weights + 0.01 * rng.normal(size=data.examples).astype(np.float32)
        cut = data.examples * 3 // 4
        self.train = ColumnSource(x=torch.from_numpy(x[:cut]), y=torch.from_numpy(y[:cut]))
        self.valid = ColumnSource(x=torch.from_numpy(x[cut:]), y=torch.from_numpy(y[cut:]))
        self.test = None
        self.features, self.bias = data.features, recipe.model.bias

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(self.features, 1, bias=self.bias)

    def loss(self, model, batch):
        return torch.nn.functional.mse_loss(model(batch["x"]).squeeze(1), batch["y"])

    def predict(self, model, batch):
        return {"pred": model(batch["x"]).squeeze(1), "y": batch["y"]}

    def metrics(self, outputs):
        return {"mse": float(np.mean((outputs["pred"] - outputs["y"]) ** 2))}

    def export(self, model, model_dir: Path) -> None:
        save_weights(model, model_dir)
        (model_dir / "toy.json").write_text(json.dumps({"features": self.features, "bias": self.bias}))


def build_task(recipe: Recipe, topology: Topology) -> ToyTask:
    return ToyTask(recipe)


def predict(run_dir: Path, inputs: list[str], output: Path | None) -> None:
    """`ddl predict RUN_DIR 0.1,0.2,0.3,0.4`: the model's output for each comma-separated row."""
    shape = json.loads((run_dir / "model" / "toy.json").read_text())
    model = torch.nn.Linear(shape["features"], 1, bias=shape["bias"])
    load_weights(model, run_dir / "model")
    rows = torch.tensor([[float(v) for v in row.split(",")] for row in inputs])
    with torch.no_grad():
        for row, value in zip(inputs, model(rows).squeeze(1).tolist(), strict=True):
            print(f"{row}\t{value:.4f}")


HOOKS = TrainerHooks(build_task=build_task, predict=predict)
