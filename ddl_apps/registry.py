"""Trainers by name: the entry points of the group `ddl_apps.trainers` (the shipped trainers register there too, in
pyproject.toml; an installed plugin package adds its own), or a module path named in a recipe (`trainer:
mypackage.mytrainer`, an importable module that defines TRAINER)."""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from ddl_apps.core.contract import ENTRY_POINTS, Trainer
from ddl_apps.errors import RecipeError

# Trainers that took a new name: recipes that name the old one keep working.
RENAMED = {"fraud": "tabular"}


@cache
def registered() -> dict[str, EntryPoint]:
    """The registered trainers' names and entry points (nothing imported yet)."""
    return {point.name: point for point in entry_points(group=ENTRY_POINTS)}


def _checked(trainer: object, where: str) -> Trainer:
    if not isinstance(trainer, Trainer):
        raise RecipeError(f"trainer {where} is a {type(trainer).__name__}, not a ddl_apps.core.contract.Trainer; see "
                          "docs/writing-a-trainer.md")
    return trainer


def _load(name: str, point: EntryPoint) -> Trainer:
    try:
        trainer = point.load()
    except Exception as e:  # a broken plugin names itself instead of breaking every command
        raise RecipeError(f"trainer {name!r} ({point.value}) failed to load: {type(e).__name__}: {e}; reinstall "
                          "its package or remove it") from None
    return _checked(trainer, f"{name!r} ({point.value})")


def _module_trainer(name: str) -> Trainer | None:
    """TRAINER of the module a recipe names by path, or None when there is no such module."""
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):  # a parent package missing, or not a module name at all ('.x')
        return None
    return _checked(getattr(importlib.import_module(name), "TRAINER", None), f"module {name!r}: its TRAINER")


@cache
def find_trainer(name: str) -> Trainer | None:
    """The trainer of a recipe's `trainer:` name, or None when there is none by that name."""
    name = RENAMED.get(name, name)
    if name in registered():
        return _load(name, registered()[name])
    return _module_trainer(name) if "." in name else None


def load_trainer(name: str) -> Trainer:
    trainer = find_trainer(name)
    if trainer is None:
        raise RecipeError(f"unknown trainer {name!r}; known: {', '.join(sorted(registered()))}")
    return trainer


def recipe_folders() -> list[Path]:
    """The folders of recipes that registered trainers ship (a trainer that fails to load is left out here; naming
    it in a recipe reports why)."""
    folders = []
    for name, point in sorted(registered().items()):
        try:
            trainer = _load(name, point)
        except RecipeError:
            continue
        if trainer.recipes is not None and trainer.recipes.is_dir():
            folders.append(trainer.recipes)
    return folders
