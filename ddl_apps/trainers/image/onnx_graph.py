"""The image model as an ONNX graph: `image` float32 [batch, size, size, channels] with pixels in [0, 1] ->
every class's probability [batch, classes]. The class names, the image size and the channels are in the file's
metadata; decoding, resizing and scaling an image file to that input are `ddl predict`'s (data.to_model_input)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from ddl_apps.trainers import onnx_export


def export(model: keras.Model, labels: dict, output: Path) -> float:
    """The ONNX file of `ddl export` (Keras's own ONNX export, through tf2onnx); the largest absolute difference
    from the framework on random images."""
    size, channels = labels["image_size"], labels["channels"]
    example = np.random.default_rng(0).random((4, size, size, channels), dtype=np.float32)
    expected = [np.asarray(model(example, training=False))]

    def convert(path: Path) -> dict[str, np.ndarray]:
        with onnx_export.quiet("tf2onnx"):
            model.export(str(path), format="onnx", verbose=False)
        onnx_export.rename_io(path, ["image"], ["probabilities"])
        return {"image": example}

    metadata = {"labels": labels["classes"], "image_size": size, "channels": channels}
    return onnx_export.write_onnx(output, convert, expected, metadata)
