"""The image recipe's prepared data (`ddl data prepare image_resnet`): shards of encoded images (PNG / JPEG bytes)
with their labels and sizes, each image checked once while preparing, in parallel; training decodes, resizes and
augments them in its input pipeline.

An image is kept as its file's bytes when training can decode it as it is (a PNG or JPEG, already grey or RGB as
the recipe's channels ask, upright); any other (palette, transparency, 16-bit, EXIF-rotated, GIF, BMP) is stored as
the lossless PNG of what training would decode from it. Array sources (the shipped digits, an .npz) become PNGs of
their uint8 pixels."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ddl_apps.data.checking import FileChecks
from ddl_apps.errors import DataError
from ddl_apps.recipe import Recipe
from ddl_apps.trainers import splits
from ddl_apps.trainers.file_inputs import file_identity, files_digest
from ddl_apps.trainers.image import data
from ddl_apps.trainers.image.config import MNIST_5K, DataConfig

SPLITS = ("train", "valid", "test")
COLUMNS = dict.fromkeys(SPLITS, {"image": "bytes", "label": "int64", "height": "int32", "width": "int32"})
READ_AT_TRAINING = frozenset({"image_size", "shift", "rotation", "zoom"})  # changing these needs no new preparation
KEPT_FORMATS = {"PNG", "JPEG"}


def checked(encoded: bytes, channels: int) -> tuple[bytes, int, int]:
    """The bytes training will decode for one image file, and its height and width; raises ValueError saying what
    is wrong with a file that is empty, not an image, cut off, or a decompression bomb."""
    from PIL import Image

    if not encoded:
        raise ValueError("the file is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(encoded)) as image:
                image.load()  # decodes every pixel: a cut-off file fails here
                kept = (image.format in KEPT_FORMATS and image.mode == ("L" if channels == 1 else "RGB")
                        and image.getexif().get(0x0112, 1) == 1)  # 0x0112: EXIF orientation; 1 is upright
                upright = image if kept else data.upright(image, channels)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ValueError(f"a decompression bomb ({e}); Pillow refuses images over {Image.MAX_IMAGE_PIXELS:,} "
                             "pixels") from None
    if not kept:
        out = io.BytesIO()
        upright.save(out, format="PNG")
        encoded = out.getvalue()
    return encoded, upright.height, upright.width


def checked_file(path: str, channels: int) -> tuple[bytes, int, int]:
    return checked(Path(path).read_bytes(), channels)


def png_images(pixels: np.ndarray) -> list[tuple[bytes, int, int]]:
    """uint8 [n, height, width, channels] arrays as PNG files (1 channel: grey, 2: grey + alpha, 3: RGB, 4: RGBA)."""
    from PIL import Image

    encoded = []
    for image in pixels:
        out = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, format="PNG", compress_level=1)
        encoded.append((out.getvalue(), image.shape[0], image.shape[1]))
    return encoded


def as_uint8(x: np.ndarray) -> np.ndarray:
    """Pixels as the in-memory path reads them (data.in_unit_range), in 8 bits."""
    scale = 255.0 if data.in_unit_range(x) else 1.0
    return np.clip(np.rint(x.astype(np.float64) * scale), 0, 255).astype(np.uint8)


class ImageSource:
    """What a recipe's images are: files of a folder of class sub-folders, or arrays (the digits, an .npz)."""

    def __init__(self, cfg: DataConfig):
        self.channels = cfg.channels
        self.files: list[Path] | None = None
        self.pixels: np.ndarray | None = None
        if cfg.source == MNIST_5K:
            pixels, self.labels, self.classes = data.read_mnist_5k()
        else:
            path = Path(cfg.source)
            if not path.exists():
                raise DataError(f"image source {path} does not exist; set data.source to a folder or an .npz file")
            if path.is_dir():
                self.files, self.labels, self.classes = data.list_folder(path)
                return
            pixels, self.labels, self.classes = data.read_npz(path)
        if pixels.shape[-1] not in (1, 2, 3, 4):
            raise DataError(f"{cfg.source}: images must have 1 to 4 channels (grey, grey + alpha, RGB, RGBA); they "
                            f"have {pixels.shape[-1]}")
        self.pixels = as_uint8(pixels)

    def encoded(self, rows: np.ndarray, checks: FileChecks, label: str) -> Iterator[list[Any]]:
        """The rows' images as `checked` keeps them, in batches, in order (see FileChecks.results)."""
        if self.files is None:
            assert self.pixels is not None
            return checks.results(png_images, self.pixels[rows], label)
        return checks.files(partial(checked_file, channels=self.channels), [str(self.files[i]) for i in rows], label)


def write_prepared(recipe: Recipe, writer: Any) -> dict[str, Any]:
    """Each split's images (stratified as the in-memory path splits them), checked and written with their labels
    and sizes; the training split shuffled across its shards."""
    cfg = recipe.data
    source = ImageSource(cfg)
    parts = splits.train_valid_test(source.labels, cfg.test_fraction, cfg.valid_fraction, recipe.run.seed, cfg.limit)
    with FileChecks("image") as checks:
        for name in SPLITS:
            rows = parts[name]
            writer.plan(name, len(rows), recipe.run.seed if name == "train" else None)
            start = 0
            for batch in source.encoded(rows, checks, f"checking {name} images"):
                images, heights, widths = zip(*batch, strict=True)
                labels = source.labels[rows[start : start + len(batch)]]
                start += len(batch)
                writer.add(name, {"image": np.array(images, dtype=object), "label": labels.astype(np.int64),
                                  "height": np.array(heights, np.int32), "width": np.array(widths, np.int32)})
        checks.raise_if_bad()
    return {"classes": source.classes}


def source_identity(recipe: Recipe) -> dict[str, Any]:
    """The shipped digits by name; an .npz by path, size and time; a folder by each file's class folder, name, size
    and modification time (one listing: a file moved to another class, or a class renamed, is prepared anew)."""
    cfg = recipe.data
    path = Path(cfg.source)
    if cfg.source == MNIST_5K or not path.is_dir():
        return file_identity(cfg.source, cfg.source == MNIST_5K)
    files = [Path(entry.path) for folder in os.scandir(path) if folder.is_dir() for entry in os.scandir(folder.path)]
    return {"source": str(path.resolve()), "files": files_digest(files, path)}


def decoded(columns: dict[str, np.ndarray], size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Prepared rows as the model's input: float32 [n, size, size, channels] in [0, 1] (decoded images are 8-bit
    whatever a batch holds), and the labels."""
    return data.decode_images(columns["image"], size, channels).astype(np.float32) / 255.0, columns["label"]
