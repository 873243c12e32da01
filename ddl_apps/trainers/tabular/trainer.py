"""Tabular trainer (binary classification: fraud, churn): the data, model, loss and metrics the PyTorch engine
needs, baselines, the charts a scoring team reads, and scoring new rows."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from ddl_apps.core.contract import Preparer, TorchTask, TrackedModel, TrainerHooks
from ddl_apps.core.dist import Topology
from ddl_apps.core.rundir import MODEL_DIR, reading_export
from ddl_apps.core.torch_engine import Batch, load_weights, save_weights
from ddl_apps.cpus import usable_cpus
from ddl_apps.data.dataset import PreparedDataset, task_splits
from ddl_apps.data.prepare import open_prepared, run_seed
from ddl_apps.errors import DataError
from ddl_apps.recipe import Recipe
from ddl_apps.trainers.tabular import charts, data, onnx_graph
from ddl_apps.trainers.tabular.model import Scorer, TabularModel, focal_loss

PREPROCESSING, ARCHITECTURE = "preprocessing.json", "model.json"
GAINS_PNG, CALIBRATION_PNG = "gains.png", "calibration.png"


def binary_metrics(label: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """On the whole split: PR-AUC (average precision), ROC-AUC, recall at 1 % false-positive rate, lift and capture
    rate in the top decile of scores, and the Brier score."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    if label.min() == label.max():
        return dict.fromkeys(("pr_auc", "roc_auc", "recall_at_1pct_fpr", "top_decile_lift", "top_decile_capture"),
                             float("nan")) | {"brier": float(np.mean((score - label) ** 2))}
    fpr, tpr, _ = roc_curve(label, score, drop_intermediate=False)  # (dropped points understate tied scores)
    capture, share = captured(label, score, 0.1)
    return {
        "pr_auc": float(average_precision_score(label, score)),
        "roc_auc": float(roc_auc_score(label, score)),
        "recall_at_1pct_fpr": float(tpr[fpr <= 0.01].max()),
        "top_decile_lift": capture / share,
        "top_decile_capture": capture,
        "brier": float(np.mean((score - label) ** 2)),
    }


def captured(label: np.ndarray, score: np.ndarray, fraction: float) -> tuple[float, float]:
    """The share of all positives among the `fraction` of rows with the highest scores (rows tied at the cut count
    in proportion: what a random order among them would give on average), and the share of rows actually taken
    (whole rows: 1 of 5 for a tenth of 5)."""
    top = max(1, round(fraction * len(score)))
    cut = np.partition(score, len(score) - top)[len(score) - top]
    above, at = score > cut, score == cut
    taken = label[above].sum() + label[at].sum() * (top - above.sum()) / at.sum()
    return float(taken / label.sum()), top / len(score)


def to_torch(columns: dict[str, np.ndarray]) -> Batch:
    return {name: torch.from_numpy(values) for name, values in columns.items()}


class TabularTask(TorchTask):
    def __init__(self, recipe: Recipe, dataset: PreparedDataset):
        cfg, self.model_cfg = recipe.data, recipe.model
        self.seed, self.dataset = recipe.run.seed, dataset
        fitted = dataset.manifest.fitted
        self.preprocessor = data.Preprocessor(**fitted["preprocessor"])
        self.train, self.valid, self.test = task_splits(dataset, cfg, self.seed, to_torch)
        positives = max(1.0, fitted["train_positives"])
        self.pos_weight = self.model_cfg.pos_weight or float(np.sqrt((self.train.examples - positives) / positives))
        self.columns = {"id": cfg.id_column, "label": cfg.label, "score": cfg.score_column}
        self.baseline_results: dict[str, dict[str, float]] = {}

    def architecture(self) -> dict:
        m = self.model_cfg
        return {"num_numeric": self.preprocessor.num_features, "cardinalities": self.preprocessor.cardinalities,
                "hidden": m.hidden, "embedding_dim": m.embedding_dim, "dropout": m.dropout, "ensemble": m.ensemble,
                "periodic": m.periodic.model_dump() if m.periodic else None}

    def build_model(self) -> torch.nn.Module:
        return TabularModel(**self.architecture())

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Each ensemble member's loss, averaged: the members train as independent models would."""
        logits = model(batch["numeric"], batch["categories"])
        target = batch["label"][:, None].expand_as(logits)
        pos_weight = 1.0 if self.model_cfg.loss == "bce" else self.pos_weight
        if self.model_cfg.loss == "focal":
            return focal_loss(logits, target, self.model_cfg.focal_gamma, pos_weight)
        weight = torch.tensor(pos_weight, device=logits.device)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)

    def predict(self, model: TabularModel, batch: Batch) -> dict[str, torch.Tensor]:
        return {"score": model.probability(batch["numeric"], batch["categories"]), "label": batch["label"]}

    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        return binary_metrics(outputs["label"], outputs["score"])

    def export(self, model: torch.nn.Module, model_dir: Path) -> None:
        save_weights(model, model_dir)
        self.preprocessor.save(model_dir / PREPROCESSING)
        (model_dir / ARCHITECTURE).write_text(json.dumps({**self.architecture(), **self.columns}))

    def tracked_model(self, model: TabularModel, batch: Batch) -> TrackedModel:
        """Each row as one array: its preprocessed numeric features, then its category indices."""
        numeric = batch["numeric"]
        features = torch.cat([numeric, batch["categories"].to(numeric.dtype)], 1).numpy()
        return TrackedModel("pytorch", Scorer(model, numeric.shape[1]).eval(), features)

    def write_artifacts(self, run_dir: Path, outputs: dict[str, np.ndarray]) -> None:
        """The baselines, trained on the same split and features and scored on the same test rows, then the
        cumulative-gains chart and the calibration plot of the model and the baselines."""
        scores = {"model": outputs["score"]}
        if self.model_cfg.baselines:
            train = self.dataset.split("train").load(max_rows=self.model_cfg.baseline_rows)
        for name in self.model_cfg.baselines:
            start = time.perf_counter()
            test = self.dataset.split("test").batches(["numeric", "categories"])
            scores[f"baseline {name}"] = baseline_scores(name, train, test, self.preprocessor, self.seed)
            self.baseline_results[f"baseline {name} (test)"] = {
                **binary_metrics(outputs["label"], scores[f"baseline {name}"]),
                "fit_seconds": round(time.perf_counter() - start, 1)}
        charts.gains_chart(outputs["label"], scores, run_dir / GAINS_PNG)
        charts.calibration_plot(outputs["label"], scores, run_dir / CALIBRATION_PNG)

    def report(self) -> dict[str, dict[str, float]]:
        return self.baseline_results


def baseline_scores(name: str, train: dict[str, np.ndarray], test: Iterable[dict[str, np.ndarray]],
                    pre: data.Preprocessor, seed: int) -> np.ndarray:
    """A scikit-learn model fitted on the training rows (a random sample of the split: it is shuffled), scoring the
    test rows batch by batch."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    if name == "gradient_boosting":
        is_categorical = [False] * pre.num_features + [c <= 255 for c in pre.cardinalities]
        model = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.1, early_stopping=True,
                                               categorical_features=is_categorical, random_state=seed)
    else:  # logistic regression on the scaled numbers and one-hot categories (a table may have either alone)
        parts = [("numbers", "passthrough", slice(0, pre.num_features)),
                 ("categories", OneHotEncoder(handle_unknown="ignore"), slice(pre.num_features, None))]
        sizes = (pre.num_features, len(pre.cardinalities))
        one_hot = ColumnTransformer([part for part, size in zip(parts, sizes, strict=True) if size])
        model = make_pipeline(one_hot, LogisticRegression(max_iter=2000))
    # The engine gives each worker one share of the cores (which also caps OpenMP); training is over and rank 0
    # alone runs this, so let it use them all.
    with threadpool_limits(limits=usable_cpus(), user_api="openmp"):
        model.fit(np.hstack([train["numeric"], train["categories"]]), train["label"])
        return np.concatenate([model.predict_proba(np.hstack([batch["numeric"], batch["categories"]]))[:, 1]
                               for batch in test])


PREPARER = Preparer(source=data.source_identity, write=data.write_prepared, columns=data.COLUMNS,
                    depends_on=run_seed)  # (it draws the sample, a random split, the shuffle)


def build_task(recipe: Recipe, topology: Topology) -> TabularTask:
    task = TabularTask(recipe, open_prepared(recipe, PREPARER))
    if topology.is_root:
        data.say(task.dataset.manifest.fitted["notes"])
    return task


def load_exported(model_dir: Path) -> tuple[TabularModel, data.Preprocessor, dict]:
    with reading_export(model_dir):
        architecture = json.loads((model_dir / ARCHITECTURE).read_text())
    columns = {k: architecture.pop(k) for k in ("id", "label", "score")}
    model = TabularModel(**architecture)
    load_weights(model, model_dir)
    return model.eval(), data.Preprocessor.load(model_dir / PREPROCESSING), columns


def predict_file(model_dir: Path, source: Path, output: Path, batch_size: int = 8192) -> int:
    """Write `output` (CSV), highest score first: the rank, the id column when the data has it (as the file writes
    it), and the score (the probability of the positive label) per row. The file is read as preparing reads the
    training table, batch by batch, so a row scores as it would have trained."""
    model, pre, columns = load_exported(model_dir)
    batch_scores: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    with data.Table(str(source), text_columns=[*pre.vocabularies, columns["id"] or ""]) as table:
        if not table.rows:
            raise DataError(f"{source} has no rows to score")
        id_column = columns["id"] if columns["id"] in table.columns else None
        wanted = [c for c in [*pre.numeric, *pre.vocabularies, *([id_column] if id_column else [])]
                  if c in table.columns]
        for frame in table.batches(wanted or table.columns, rows=batch_size):
            numeric, categories = pre.transform(frame)  # (names any column the model needs that the file lacks)
            with torch.no_grad():
                batch_scores.append(model.probability(torch.from_numpy(numeric),
                                                      torch.from_numpy(categories)).numpy())
            ids += [frame[id_column].to_numpy()] if id_column else []
    scores = np.concatenate(batch_scores)
    result = pd.DataFrame({columns["score"]: scores})
    if id_column:
        result.insert(0, id_column, np.concatenate(ids))
    result = result.iloc[np.argsort(-scores, kind="stable")]
    result.insert(0, "rank", np.arange(1, len(result) + 1))
    partial = output.with_name(f".{output.name}.partial")
    result.to_csv(partial, index=False)
    partial.rename(output)  # never a half-written scores file
    return len(result)


def predict_cli(run_dir: Path, inputs: list[str], output: Path | None) -> None:
    """`ddl predict RUN_DIR data.csv -o scores.csv`."""
    if len(inputs) != 1 or output is None:
        raise DataError("scoring a table takes one CSV/Parquet file and -o OUTPUT.csv: "
                        "ddl predict RUN_DIR data.csv -o scores.csv")
    rows = predict_file(run_dir / MODEL_DIR, Path(inputs[0]), output)
    print(f"wrote {rows} scores to {output}")


def export_onnx(model_dir: Path, output: Path) -> float:
    return onnx_graph.export(*load_exported(model_dir), output)


HOOKS = TrainerHooks(build_task=build_task, predict=predict_cli, prepare=PREPARER, export_onnx=export_onnx)
