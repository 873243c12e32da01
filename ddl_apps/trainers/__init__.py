"""The trainer registry: recipe `trainer:` name -> package with `config.py` (schemas) and `trainer.py`.

A recipe may also name a trainer of its own by module path (`trainer: mypackage.mytrainer`): any importable
package with the same two modules.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

TRAINERS = {
    "fraud": "ddl_apps.trainers.fraud",
    "image": "ddl_apps.trainers.image",
    "asr": "ddl_apps.trainers.asr",
    "nlp": "ddl_apps.trainers.nlp",
    "recsys": "ddl_apps.trainers.recsys",
}


def trainer_package(name: str) -> str | None:
    """The package of a trainer name, or None when there is no such trainer."""
    if name in TRAINERS:
        return TRAINERS[name]
    if "." in name:
        try:
            return name if importlib.util.find_spec(f"{name}.trainer") else None
        except (ImportError, ValueError):  # no such module, or not a module name at all ('.x')
            return None
    return None


def trainer_schemas(name: str) -> tuple[type, type]:
    """The pydantic models of a trainer's `data` and `model` recipe sections (light import: no frameworks)."""
    config = importlib.import_module(f"{trainer_package(name)}.config")
    return config.DataConfig, config.ModelConfig


def load_trainer(name: str) -> ModuleType:
    return importlib.import_module(f"{trainer_package(name)}.trainer")
