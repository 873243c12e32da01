"""The Keras probe takes the PyTorch probe's data and model settings."""

from tests.probe.config import DataConfig, ModelConfig

__all__ = ["DataConfig", "ModelConfig"]
