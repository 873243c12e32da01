"""The trainer registry: recipe `trainer:` name -> package with `config.py` (schemas) and `trainer.py`."""

from __future__ import annotations

import importlib
from types import ModuleType

TRAINERS = {
    "fraud": "ddl_apps.trainers.fraud",
}


def trainer_schemas(name: str) -> tuple[type, type]:
    """The pydantic models of a trainer's `data` and `model` recipe sections (light import: no frameworks)."""
    config = importlib.import_module(f"{TRAINERS[name]}.config")
    return config.DataConfig, config.ModelConfig


def load_trainer(name: str) -> ModuleType:
    return importlib.import_module(f"{TRAINERS[name]}.trainer")
