"""Issue 6: the image trainer on the Keras engine: runs, artifacts, prediction, and bring-your-own images."""

import json

import numpy as np
import pytest
import tensorflow as tf
from mlflow import MlflowClient
from PIL import Image

from ddl_apps.core.rundir import load_run_recipe
from ddl_apps.trainers.image import data
from tests.engine_runs import ddl, final_weights, summary, train
from tests.mlflow_server import logged_model, tracked_run
from tests.trainers.onnx_checks import exported, largest_difference

SLICE = ("data.limit=600", "optim.epochs=1", "optim.batch_size=32", "model.width=8", "run.log_every=5")


def save_png(array: np.ndarray, path):
    pixels = np.round(array * 255).astype(np.uint8)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)


# Slow because it must: a Keras run at np=2 with its full export (SavedModel included), then predict and eval.
@pytest.mark.distributed
def test_two_workers_artifacts_and_predict_agrees_with_evaluation(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    run = train(tmp_path / "run", *SLICE, np=2, recipe="image_resnet")
    result = summary(run)
    assert len(set(result["weights_sha256_by_rank"])) == 1 and len(result["weights_sha256_by_rank"]) == 2
    assert 0 <= result["results"]["model (test)"]["accuracy"] <= 1
    assert result["training"]["samples"] == result["steps"] * 32 * 2 and result["training"]["samples_per_s"] > 0
    for name in ("confusion_matrix.png", "per_class_accuracy.json", "curves.png", "model/model.keras",
                 "model/saved_model/saved_model.pb", "model/model.weights.h5", "model/labels.json"):
        assert (run / name).exists(), name
    assert sorted(json.loads((run / "per_class_accuracy.json").read_text())) == [str(d) for d in range(10)]

    recipe = load_run_recipe(run)
    test = data.stratified_splits(data.read_images(recipe.data), recipe.data, recipe.run.seed)["test"]
    files = []
    for i in range(40):
        save_png(test.x[i], tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    printed = ddl("predict", str(run), *files)
    assert printed.returncode == 0, printed.stderr
    predicted = [int(line.split("\t")[1]) for line in printed.stdout.splitlines()]
    evaluated = np.load(run / "test_outputs.npz")
    assert predicted == evaluated["pred"][:40].tolist()
    metrics = json.loads(ddl("eval", str(run)).stdout)
    assert metrics["accuracy"] == pytest.approx(result["results"]["model (test)"]["accuracy"])

    # tracked by rank 0 alone: the Keras flavour predicts the first test images as the evaluation did
    client, tracked = MlflowClient(mlflow_uri), tracked_run(mlflow_uri, run)
    assert len(client.search_runs([tracked.info.experiment_id], f"tags.`ddl.run_dir` = '{run}'")) == 1
    assert {"confusion_matrix.png", "per_class_accuracy.json"} <= {a.path for a in client.list_artifacts(
        tracked.info.run_id)}
    assert tracked.data.metrics["test/accuracy"] == result["results"]["model (test)"]["accuracy"]
    model, inputs = logged_model(mlflow_uri, run)
    probabilities = np.asarray(model.predict(model.input_example))
    assert inputs.is_tensor_spec() and probabilities.shape == (len(model.input_example), 10)
    assert probabilities.argmax(1).tolist() == evaluated["pred"][: len(probabilities)].tolist()
    np.testing.assert_allclose(probabilities.max(1), evaluated["probability"][: len(probabilities)], atol=1e-6)


def shapes_folder(root, per_class=24, size=20):
    """Three classes of generated RGB pictures: horizontal bars, vertical bars, squares."""
    rng = np.random.default_rng(0)
    for name in ("horizontal", "vertical", "square"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.uniform(0, 0.2, (size, size, 3))
            a, b = rng.integers(2, size - 8, 2)
            if name == "horizontal":
                image[a : a + 3, 2:-2] = 1
            elif name == "vertical":
                image[2:-2, b : b + 3] = 1
            else:
                image[a : a + 7, b : b + 7] = 1
            save_png(image, root / name / f"{i}.png")


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A run on a folder of generated RGB pictures of three classes."""
    folder = tmp_path_factory.mktemp("shapes")
    shapes_folder(folder / "shapes")
    return train(folder / "run", f"data.source={folder / 'shapes'}", "data.image_size=16", "data.channels=3",
                 "data.test_fraction=0.25", "optim.epochs=10", "optim.batch_size=8", "model.width=8",
                 "run.log_every=5", recipe="image_resnet"), folder / "shapes"


def test_bring_your_own_folder_trains_and_predicts(shapes_run):
    run, shapes = shapes_run
    assert summary(run)["results"]["model (test)"]["accuracy"] >= 0.9  # the shapes are easy: it learned them
    printed = ddl("predict", str(run), *(str(shapes / name / "0.png") for name in ("square", "vertical")))
    assert printed.returncode == 0, printed.stderr
    assert [line.split("\t")[1] for line in printed.stdout.splitlines()] == ["square", "vertical"]


def test_onnx_export_classifies_the_test_split_as_keras_did(shapes_run, tmp_path):
    """Issue 38: images in [0, 1] in, every class's probability out; the class names in the file's metadata."""
    run, _ = shapes_run
    session, metadata = exported(run, tmp_path / "image.onnx")
    assert metadata["labels"] == ["horizontal", "square", "vertical"] and metadata["image_size"] == 16
    recipe = load_run_recipe(run)
    test = data.stratified_splits(data.read_images(recipe.data), recipe.data, recipe.run.seed)["test"]
    [probabilities] = session.run(None, {"image": test.x})  # 18 images (the export's example: 4)
    evaluated = np.load(run / "test_outputs.npz")  # Keras's, in the final evaluation
    assert probabilities.argmax(1).tolist() == evaluated["pred"].tolist()
    assert largest_difference(probabilities.max(1), evaluated["probability"]) < 1e-5  # measured: 1.2e-07
    [alone] = session.run(None, {"image": test.x[:1]})
    np.testing.assert_allclose(alone, probabilities[:1], atol=1e-6)


def test_corrupt_image_is_named_and_nothing_is_written(tmp_path):
    shapes_folder(tmp_path / "shapes", per_class=4)
    (tmp_path / "shapes" / "square" / "broken.png").write_bytes(b"\x89PNG not really")
    result = ddl("train", "image_resnet", f"data.source={tmp_path / 'shapes'}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "broken.png" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_npz_source_and_its_errors(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (30, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "ok.npz", x=x, y=np.repeat([3, 7, 9], 10))
    images = data.read_images(data.DataConfig(source=str(tmp_path / "ok.npz"), image_size=16))
    assert images.x.shape == (30, 16, 16, 1) and images.classes == ["3", "7", "9"] and images.y.max() == 2
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(data.DataError, match="arrays named 'x'"):
        data.read_images(data.DataConfig(source=str(tmp_path / "bad.npz")))


# Slow because it must: three Keras runs (uninterrupted, stopped, resumed).
def test_augmented_training_resumes_exactly(tmp_path):
    """Stopped mid-epoch and resumed, a run with random augmentation and dropout ends with the uninterrupted run's
    weights: each batch's augmentation is drawn from its position, not from a layer's random state (which lived
    on the task, outside the checkpoint, and which the prefetching pipeline had advanced past the stop)."""
    full = train(tmp_path / "full", *SLICE, "optim.epochs=2", recipe="image_resnet")
    run = train(tmp_path / "run", *SLICE, "optim.epochs=2", "run.max_steps=17", recipe="image_resnet")
    train(run, *SLICE, "optim.epochs=2", recipe="image_resnet", flags=("--resume",))
    assert summary(run)["steps"] == summary(full)["steps"]
    np.testing.assert_allclose(final_weights(run), final_weights(full), rtol=0, atol=1e-6)


def test_augmentation_moves_shifts_rotates_and_zooms_within_bounds():
    from ddl_apps.trainers.image.trainer import random_affine

    square = np.zeros((1, 21, 21, 1), np.float32)
    square[:, 8:13, 8:13] = 1
    batch = np.repeat(square, 64, axis=0)
    seed = tf.constant([3, 4], tf.int64)
    moved = np.asarray(random_affine(batch, seed, shift=0.1, rotation=0.05, zoom=0.1))
    assert np.array_equal(moved, np.asarray(random_affine(batch, seed, 0.1, 0.05, 0.1)))  # a seed draws the same
    assert not np.array_equal(moved, np.asarray(random_affine(batch, tf.constant([3, 5], tf.int64), 0.1, 0.05, 0.1)))
    centres = [np.argwhere(image[..., 0] > 0.5).mean(0) for image in moved]
    assert np.abs(np.array(centres) - 10).max() <= 0.1 * 21 + 1  # shifted by at most 10 % (and rounding)
    assert len({tuple(np.round(c, 1)) for c in centres}) > 32  # and each image its own way
    still = np.asarray(random_affine(batch, seed, shift=0.0, rotation=0.0, zoom=0.0))
    np.testing.assert_allclose(still, batch, atol=1e-6)
