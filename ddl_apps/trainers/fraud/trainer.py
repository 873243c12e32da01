"""Fraud trainer: the data, model, loss and metrics the PyTorch engine needs, plus scoring new transactions."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from ddl_apps.core.contract import Preparer, TorchTask, TrainerHooks
from ddl_apps.core.dist import Topology
from ddl_apps.core.rundir import MODEL_DIR, reading_export
from ddl_apps.core.torch_engine import Batch, load_weights, save_weights
from ddl_apps.data.dataset import PreparedDataset, task_splits
from ddl_apps.data.prepare import open_prepared
from ddl_apps.errors import DataError
from ddl_apps.recipe import Recipe
from ddl_apps.trainers.fraud import data
from ddl_apps.trainers.fraud.model import TabularMLP, focal_loss

PREPROCESSING, ARCHITECTURE = "preprocessing.json", "model.json"


def fraud_metrics(label: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """PR-AUC (average precision), ROC-AUC and recall at 1 % false-positive rate, on the whole split."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    if label.min() == label.max():
        return {"pr_auc": float("nan"), "roc_auc": float("nan"), "recall_at_1pct_fpr": float("nan")}
    fpr, tpr, _ = roc_curve(label, score, drop_intermediate=False)  # (dropped points understate tied scores)
    return {
        "pr_auc": float(average_precision_score(label, score)),
        "roc_auc": float(roc_auc_score(label, score)),
        "recall_at_1pct_fpr": float(tpr[fpr <= 0.01].max()),
    }


def to_torch(columns: dict[str, np.ndarray]) -> Batch:
    return {name: torch.from_numpy(values) for name, values in columns.items()}


class FraudTask(TorchTask):
    def __init__(self, recipe: Recipe, dataset: PreparedDataset):
        cfg, self.model_cfg = recipe.data, recipe.model
        self.seed, self.dataset = recipe.run.seed, dataset
        fitted = dataset.manifest.fitted
        self.preprocessor = data.Preprocessor(**fitted["preprocessor"])
        self.train, self.valid, self.test = task_splits(dataset, cfg, self.seed, to_torch)
        positives = max(1.0, fitted["train_positives"])
        self.pos_weight = self.model_cfg.pos_weight or float(np.sqrt((self.train.examples - positives) / positives))
        self.columns = {"id": cfg.id_column, "label": cfg.label}

    def architecture(self) -> dict:
        m = self.model_cfg
        return {"num_numeric": self.preprocessor.num_features, "cardinalities": self.preprocessor.cardinalities,
                "hidden": m.hidden, "embedding_dim": m.embedding_dim, "dropout": m.dropout}

    def build_model(self) -> torch.nn.Module:
        return TabularMLP(**self.architecture())

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch["numeric"], batch["categories"])
        if self.model_cfg.loss == "focal":
            return focal_loss(logits, batch["label"], self.model_cfg.focal_gamma, self.pos_weight)
        weight = torch.tensor(self.pos_weight, device=logits.device)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"], pos_weight=weight)

    def predict(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return {"score": torch.sigmoid(model(batch["numeric"], batch["categories"])), "label": batch["label"]}

    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        return fraud_metrics(outputs["label"], outputs["score"])

    def export(self, model: torch.nn.Module, model_dir: Path) -> None:
        save_weights(model, model_dir)
        self.preprocessor.save(model_dir / PREPROCESSING)
        (model_dir / ARCHITECTURE).write_text(json.dumps({**self.architecture(), **self.columns}))

    def report(self) -> dict[str, dict[str, float]]:
        """A gradient-boosting baseline on the same split and features, scored on the same test rows."""
        if not self.model_cfg.baseline:
            return {}
        from sklearn.ensemble import HistGradientBoostingClassifier

        start = time.perf_counter()
        train = self.dataset.split("train").load(max_rows=self.model_cfg.baseline_rows)
        test = self.dataset.split("test").load()
        is_categorical = [False] * self.preprocessor.num_features + [c <= 255 for c in self.preprocessor.cardinalities]
        baseline = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.1, early_stopping=True,
                                                  categorical_features=is_categorical, random_state=self.seed)
        # The engine gives each worker one share of the cores (which also caps OpenMP); training is over and
        # rank 0 alone runs this, so let it use them all.
        with threadpool_limits(limits=os.cpu_count(), user_api="openmp"):
            baseline.fit(np.hstack([train["numeric"], train["categories"]]), train["label"])
            scores = baseline.predict_proba(np.hstack([test["numeric"], test["categories"]]))[:, 1]
        metrics = fraud_metrics(test["label"], scores)
        return {"baseline HGB (test)": {**metrics, "fit_seconds": round(time.perf_counter() - start, 1)}}


PREPARER = Preparer(source=data.source_identity, write=data.write_prepared, columns=data.COLUMNS,
                    depends_on=data.preparation_depends_on)


def build_task(recipe: Recipe, topology: Topology) -> FraudTask:
    return FraudTask(recipe, open_prepared(recipe, PREPARER))


def load_exported(model_dir: Path) -> tuple[TabularMLP, data.Preprocessor, dict]:
    with reading_export(model_dir):
        architecture = json.loads((model_dir / ARCHITECTURE).read_text())
    columns = {k: architecture.pop(k) for k in ("id", "label")}
    model = TabularMLP(**architecture)
    load_weights(model, model_dir)
    return model.eval(), data.Preprocessor.load(model_dir / PREPROCESSING), columns


def predict_file(model_dir: Path, source: Path, output: Path, batch_size: int = 8192) -> int:
    """Write `output` (CSV): the id column when the data has it, and fraud_probability per row."""
    model, pre, columns = load_exported(model_dir)
    frame = data.read_table(str(source))
    if frame.empty:
        raise DataError(f"{source} has no rows to score")
    numeric, categories = pre.transform(frame)
    with torch.no_grad():
        scores = np.concatenate([
            torch.sigmoid(model(torch.from_numpy(numeric[i : i + batch_size]),
                                torch.from_numpy(categories[i : i + batch_size]))).numpy()
            for i in range(0, len(frame), batch_size)
        ])
    result = pd.DataFrame({"fraud_probability": scores})
    if columns["id"] and columns["id"] in frame.columns:
        result.insert(0, columns["id"], frame[columns["id"]].to_numpy())
    partial = output.with_name(f".{output.name}.partial")
    result.to_csv(partial, index=False)
    partial.rename(output)  # never a half-written scores file
    return len(result)


def predict_cli(run_dir: Path, inputs: list[str], output: Path | None) -> None:
    """`ddl predict RUN_DIR data.csv -o scores.csv`."""
    if len(inputs) != 1 or output is None:
        raise DataError("fraud scoring takes one CSV/Parquet file and -o OUTPUT.csv: "
                        "ddl predict RUN_DIR data.csv -o scores.csv")
    rows = predict_file(run_dir / MODEL_DIR, Path(inputs[0]), output)
    print(f"wrote {rows} scores to {output}")


HOOKS = TrainerHooks(build_task=build_task, predict=predict_cli, prepare=PREPARER)
