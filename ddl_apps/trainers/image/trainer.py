"""Image trainer: data, model, loss, augmentation and metrics for the Keras engine, plus `ddl predict` on images."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ddl_apps.core.contract import KerasTask, Preparer, TrackedModel, TrainerHooks
from ddl_apps.core.dist import Topology
from ddl_apps.core.rundir import MODEL_DIR, reading_export
from ddl_apps.core.tf_engine import ColumnSource, save_weights
from ddl_apps.data.dataset import task_splits
from ddl_apps.data.prepare import open_prepared, run_seed
from ddl_apps.recipe import Recipe
from ddl_apps.trainers import file_inputs
from ddl_apps.trainers.image import data, onnx_graph, prepared
from ddl_apps.trainers.image.model import small_resnet

KERAS_FILE, SAVED_MODEL, LABELS = "model.keras", "saved_model", "labels.json"
CONFUSION_PNG, PER_CLASS_JSON = "confusion_matrix.png", "per_class_accuracy.json"


def per_class_accuracy(y: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    return np.array([np.mean(pred[y == c] == c) if np.any(y == c) else np.nan for c in range(classes)])


def random_affine(images, seed, shift: float, rotation: float, zoom: float):
    """Each image of a batch (N, H, W, C) shifted by up to `shift` of its size, rotated by up to `rotation` of a
    turn and zoomed by up to `zoom`, around its centre, uniformly at random from the stateless `seed`; what
    falls outside is filled with 0 (as Keras's RandomTranslation, RandomRotation and RandomZoom with
    fill_mode='constant')."""
    shape = tf.shape(images)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    draws = tf.random.stateless_uniform([shape[0], 4], seed=seed, minval=-1.0, maxval=1.0)
    tx, ty = draws[:, 0] * shift * width, draws[:, 1] * shift * height
    angle, scale = draws[:, 2] * rotation * 2 * np.pi, 1.0 + draws[:, 3] * zoom
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # the inverse map, output pixel -> input pixel: centre + rotation(-angle) (output - centre - shift) / scale
    a2 = cx - cos * (cx + tx) - sin * (cy + ty)
    b2 = cy + sin * (cx + tx) - cos * (cy + ty)
    zeros = tf.zeros_like(cos)
    transform = tf.stack([cos, sin, a2, -sin, cos, b2, zeros, zeros], axis=1)
    return keras.ops.image.affine_transform(images, transform, interpolation="bilinear", fill_mode="constant")


class ImageTask(KerasTask):
    loss = "sparse_categorical_crossentropy"

    def __init__(self, recipe: Recipe, classes: list[str], train: Any, valid: Any, test: Any, decode: Any = None):
        self.data_cfg, self.model_cfg, self.classes = recipe.data, recipe.model, classes
        self.train, self.valid, self.test, self.decode = train, valid, test, decode

    def build_model(self) -> keras.Model:
        size, m = self.data_cfg.image_size, self.model_cfg
        return small_resnet((size, size, self.data_cfg.channels), len(self.classes), m.width, m.blocks, m.dropout)

    def augment(self, x, y, seed):
        """Random shifts, rotations and zooms of a training batch (in the tf.data pipeline), drawn from `seed`."""
        cfg = self.data_cfg
        return random_affine(x, seed, cfg.shift, cfg.rotation, cfg.zoom), y

    def predict(self, model: keras.Model, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        probabilities = np.asarray(model(batch["x"], training=False))
        return {"pred": probabilities.argmax(1), "probability": probabilities.max(1), "y": batch["y"]}

    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        per_class = per_class_accuracy(outputs["y"], outputs["pred"], len(self.classes))
        return {"accuracy": float(np.mean(outputs["pred"] == outputs["y"])),
                "worst_class_accuracy": float(np.nanmin(per_class))}

    def write_artifacts(self, run_dir: Path, outputs: dict[str, np.ndarray]) -> None:
        """Per-class accuracy (JSON) and the confusion matrix (PNG) of the final evaluation."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.metrics import ConfusionMatrixDisplay

        per_class = per_class_accuracy(outputs["y"], outputs["pred"], len(self.classes))
        (run_dir / PER_CLASS_JSON).write_text(json.dumps(dict(zip(self.classes, per_class.tolist(), strict=True))))
        fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(self.classes),) * 2)
        ConfusionMatrixDisplay.from_predictions(outputs["y"], outputs["pred"], labels=range(len(self.classes)),
                                                display_labels=self.classes, ax=ax, colorbar=False)
        ax.set_title(f"test accuracy {np.mean(outputs['pred'] == outputs['y']):.4f}")
        fig.tight_layout()
        fig.savefig(run_dir / CONFUSION_PNG, dpi=90)
        plt.close(fig)

    def export(self, model: keras.Model, model_dir: Path) -> None:
        save_weights(model, model_dir)
        model.save(model_dir / KERAS_FILE)
        model.export(str(model_dir / SAVED_MODEL), format="tf_saved_model", verbose=False)
        cfg = self.data_cfg
        (model_dir / LABELS).write_text(json.dumps({"classes": self.classes, "image_size": cfg.image_size,
                                                    "channels": cfg.channels}))

    def tracked_model(self, model: keras.Model, batch: dict[str, np.ndarray]) -> TrackedModel:
        """An uncompiled copy: the run's optimizer is Horovod's, which MLflow's loader could not rebuild."""
        copy = keras.Model.from_config(model.get_config())
        copy.set_weights(model.get_weights())
        return TrackedModel("keras", copy, np.asarray(batch["x"], dtype=np.float32))

    def report(self) -> dict[str, dict[str, float]]:
        return {}


PREPARER = Preparer(source=prepared.source_identity, write=prepared.write_prepared, columns=prepared.COLUMNS,
                    depends_on=run_seed, read_at_training=prepared.READ_AT_TRAINING)


def build_task(recipe: Recipe, topology: Topology) -> ImageTask:
    """The images decoded into memory on every worker, or, with data.prepared, streamed from a prepared dataset:
    the training split's encoded images decoded in the input pipeline, the others as they are read."""
    cfg = recipe.data
    if cfg.prepared is None:
        parts = data.stratified_splits(data.read_images(cfg), cfg, recipe.run.seed)
        return ImageTask(recipe, parts["train"].classes, *(ColumnSource(x=p.x, y=p.y) for p in parts.values()))
    dataset = open_prepared(recipe, PREPARER)
    decode = functools.partial(prepared.decoded, size=cfg.image_size, channels=cfg.channels)
    x_and_y = lambda rows: dict(zip("xy", decode(rows), strict=True))  # noqa: E731
    train, valid, test = task_splits(dataset, cfg, recipe.run.seed, x_and_y,
                                     train_convert=lambda rows: {k: rows[k] for k in ("image", "label")})
    return ImageTask(recipe, dataset.manifest.fitted["classes"], train, valid, test, decode)


def load_exported(model_dir: Path) -> tuple[keras.Model, dict]:
    """The exported .keras model (safe mode: no code) and its labels.json."""
    with reading_export(model_dir):
        labels = json.loads((model_dir / LABELS).read_text())
        return keras.saving.load_model(model_dir / KERAS_FILE, compile=False, safe_mode=True), labels


def classify_files(model_dir: Path, files: list[Path]) -> list[tuple[str, float]]:
    """(class name, probability) for each image file, with the model a run exported."""
    model, labels = load_exported(model_dir)
    images = data.load_image_files(files, labels["image_size"], labels["channels"])
    probabilities = np.asarray(model(data.to_model_input(images, labels["image_size"], labels["channels"]),
                                     training=False))
    return [(labels["classes"][i], float(p[i])) for p, i in zip(probabilities, probabilities.argmax(1), strict=True)]


def predict_cli(run_dir: Path, inputs: list[str], output: Path | None) -> None:
    """`ddl predict RUN_DIR image.png ...`: prints file, class and probability, one line each."""
    images = file_inputs.existing_files(inputs, "image")
    classified = classify_files(run_dir / MODEL_DIR, images)
    file_inputs.print_rows(["file", "class", "probability"],
                     [[str(f), name, f"{p:.4f}"] for f, (name, p) in zip(images, classified, strict=True)], output)


def export_onnx(model_dir: Path, output: Path) -> float:
    return onnx_graph.export(*load_exported(model_dir), output)


HOOKS = TrainerHooks(build_task=build_task, predict=predict_cli, prepare=PREPARER, export_onnx=export_onnx)
