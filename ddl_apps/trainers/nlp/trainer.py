"""Text-classification trainer: fine-tunes a transformer encoder (cross-entropy) on the PyTorch engine; accuracy and
macro-F1 over whole splits; exports with save_pretrained; `ddl predict RUN_DIR "some text" ...`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddl_apps.core.contract import Preparer, TorchTask, TrackedModel, TrainerHooks
from ddl_apps.core.dist import Topology
from ddl_apps.core.rundir import MODEL_DIR
from ddl_apps.core.torch_engine import Batch
from ddl_apps.data.dataset import PreparedDataset, task_splits
from ddl_apps.data.prepare import open_prepared
from ddl_apps.errors import DataError
from ddl_apps.recipe import Recipe
from ddl_apps.trainers.nlp import data, model, onnx_graph

PREDICTIONS = "test_predictions.jsonl"


def classification_metrics(label: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean of per-label F1, so a rare label counts as much as a common one)."""
    from sklearn.metrics import f1_score

    return {"accuracy": float(np.mean(label == predicted)),
            "macro_f1": float(f1_score(label, predicted, average="macro", zero_division=0))}


def prediction_record(text: str, probabilities: np.ndarray, names: list[str]) -> dict:
    """One text's prediction as written to files: the label, its probability, and every label's."""
    best = int(np.argmax(probabilities))
    return {"text": text, "predicted": names[best], "probability": float(probabilities[best]),
            "probabilities": {name: float(p) for name, p in zip(names, probabilities, strict=True)}}


class TextTask(TorchTask):
    def __init__(self, recipe: Recipe, dataset: PreparedDataset, folder: Path):
        self.data_cfg, self.model_cfg, self.folder, self.dataset = recipe.data, recipe.model, folder, dataset
        self.label_names = dataset.manifest.fitted["label_names"]
        self.tokenizer = model.load_tokenizer(folder, self.data_cfg.max_length)
        self.config = model.classifier_config(folder, self.label_names, self.model_cfg, self.data_cfg.max_length)
        # training steps hold texts of similar length (less padding): see LaneOrder's bucketing
        self.train, self.valid, self.test = task_splits(dataset, self.data_cfg, recipe.run.seed, data.to_batch,
                                                        bucket_by="length")

    def build_model(self) -> torch.nn.Module:
        return model.build_classifier(self.folder, self.config, self.model_cfg.pretrained)

    def logits(self, classifier: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    def loss(self, classifier: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.logits(classifier, batch), batch["label"])

    def predict(self, classifier: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        probabilities = self.logits(classifier, batch).softmax(-1)
        return {"predicted": probabilities.argmax(-1), "label": batch["label"], "probabilities": probabilities,
                "index": batch["index"]}

    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        return classification_metrics(outputs["label"], outputs["predicted"])

    def write_artifacts(self, run_dir: Path, outputs: dict[str, np.ndarray]) -> None:
        """Every test text with its true label and the prediction, as JSON lines (what `ddl predict` prints for
        the same text with the exported model)."""
        texts = (text for batch in self.dataset.split("test").batches(["text"]) for text in batch["text"])
        predictions = zip(outputs["index"], outputs["label"], outputs["probabilities"], strict=True)
        with (run_dir / PREDICTIONS).open("w") as f:  # (outputs are in the split's order, as the texts)
            for (index, label, probabilities), text in zip(predictions, texts, strict=True):
                record = prediction_record(text, probabilities, self.label_names)
                f.write(json.dumps({"index": int(index), "label": self.label_names[label], **record}) + "\n")

    def export(self, classifier: Any, model_dir: Path) -> None:
        model.save_exported(classifier, self.tokenizer, model_dir)

    def tracked_model(self, classifier: Any, batch: Batch) -> TrackedModel:
        """A text-classification pipeline (the tokenizer and the model); the batch's texts as its input example."""
        rows = np.asarray(batch["index"])
        texts = self.dataset.split("test").load(int(rows.max()) + 1, ["text"])["text"][rows]
        return TrackedModel("transformers", {"model": classifier, "tokenizer": self.tokenizer},
                            [str(text) for text in texts], task="text-classification")

    def report(self) -> dict[str, dict[str, float]]:
        """A TF-IDF + logistic-regression baseline on the same split, scored on the same test texts: how much the
        transformer adds over word counts; fitted on at most `model.baseline_rows` training texts, scoring the test
        texts batch by batch."""
        if not self.model_cfg.baseline:
            return {}
        train = self.dataset.split("train").load(self.model_cfg.baseline_rows, ["text", "label"])
        if len(np.unique(train["label"])) < 2:
            return {}
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        start = time.perf_counter()
        baseline = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                                 LogisticRegression(max_iter=1000))
        baseline.fit(list(train["text"]), train["label"])
        labels, predicted = [], []
        for batch in self.dataset.split("test").batches(["text", "label"]):
            labels.append(batch["label"])
            predicted.append(baseline.predict(list(batch["text"])))
        metrics = classification_metrics(np.concatenate(labels), np.concatenate(predicted))
        return {"baseline TF-IDF LR (test)": {**metrics, "fit_seconds": round(time.perf_counter() - start, 1)}}


PREPARER = Preparer(source=data.source_identity, write=data.write_prepared, columns=data.COLUMNS,
                    depends_on=data.preparation_depends_on)


def build_task(recipe: Recipe, topology: Topology) -> TextTask:
    """The texts, tokenised once into a prepared dataset; a bad model folder or data file fails here, before the
    run directory is made."""
    folder = model.model_folder(recipe.model.source, weights=recipe.model.pretrained)
    return TextTask(recipe, open_prepared(recipe, PREPARER), folder)


@torch.no_grad()
def predict_texts(model_dir: Path, texts: list[str], batch_size: int = 32) -> list[dict]:
    """Predictions (prediction_record) for texts, with the model and tokenizer a run exported."""
    classifier, tokenizer = model.load_exported(model_dir)
    config: Any = classifier.config  # (transformers types id2label and num_labels as optional)
    names = [config.id2label[i] for i in range(config.num_labels)]
    records = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        encoded = tokenizer(chunk, truncation=True, padding=True, return_token_type_ids=False, return_tensors="pt")
        probabilities = classifier(**encoded).logits.float().softmax(-1).numpy()
        records += [prediction_record(t, p, names) for t, p in zip(chunk, probabilities, strict=True)]
    return records


def predict_cli(run_dir: Path, inputs: list[str], output: Path | None) -> None:
    """`ddl predict RUN_DIR "some text" ...`: label, probability and text, one line each; with -o, also JSON lines
    with every label's probability."""
    blank = [i + 1 for i, text in enumerate(inputs) if not text.strip()]
    if blank:
        raise DataError(f"text number {', '.join(map(str, blank))} is empty; pass the texts to classify, quoted")
    records = predict_texts(run_dir / MODEL_DIR, list(inputs))
    print("\n".join(f"{r['predicted']}\t{r['probability']:.4f}\t{r['text']}" for r in records))
    if output is not None:
        output.write_text("".join(json.dumps(r) + "\n" for r in records))


def export_onnx(model_dir: Path, output: Path) -> float:
    return onnx_graph.export(*model.load_exported(model_dir), output)


HOOKS = TrainerHooks(build_task=build_task, predict=predict_cli, prepare=PREPARER, export_onnx=export_onnx)
