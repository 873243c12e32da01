"""The run directory: one folder per run holding its resolved config, metrics, checkpoints and model."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ddl_apps.core.redact import redact
from ddl_apps.errors import CheckpointError, RecipeError
from ddl_apps.recipe import Recipe

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
SUMMARY_FILE = "summary.json"


def choose_run_dir(recipe: Recipe, resume: bool) -> Path:
    """run.dir if given; on --resume the newest runs/<recipe>-*; else a new runs/<recipe>-<time>."""
    if recipe.run.dir:
        return Path(recipe.run.dir)
    if resume:  # runs of this recipe only: not those of another whose name starts with this one's
        this_recipe = re.compile(rf"{re.escape(recipe.name)}-\d{{8}}-\d{{6}}")
        runs = Path("runs")
        earlier = sorted((p for p in (runs.iterdir() if runs.is_dir() else []) if this_recipe.fullmatch(p.name)),
                         key=lambda p: p.stat().st_mtime)
        if not earlier:
            raise RecipeError(f"--resume found no earlier run of {recipe.name!r} under runs/; name one with run.dir=")
        return earlier[-1]
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_new_run(run_dir: Path, resume: bool) -> None:
    """A new run (not --resume) must not write into an earlier run's directory."""
    if not resume and (run_dir / CHECKPOINTS).exists():
        raise RecipeError(
            f"run directory {run_dir} already holds a run; continue it with --resume or choose another run.dir"
        )


def prepare_run_dir(run_dir: Path, recipe: Recipe, resume: bool) -> None:
    """Create the run directory (private to the user) and write the resolved config; rank 0 only."""
    check_new_run(run_dir, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(resolved_config(recipe, run_dir), sort_keys=False))


def resolved_config(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """The recipe as the run trains it, secrets redacted: what config.yaml holds (and experiment tracking logs)."""
    resolved = recipe.model_dump(mode="json")
    resolved["run"]["dir"] = str(run_dir)
    return redact(resolved)


def load_run_recipe(run_dir: Path) -> Recipe:
    """The recipe a run was trained with (validated again, so the trainer's sections are typed)."""
    from ddl_apps.recipe import load_recipe

    config = Path(run_dir) / CONFIG_FILE
    if not config.is_file():
        raise RecipeError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); pass the folder 'ddl train' made")
    return load_recipe(config)


@contextmanager
def reading_export(model_dir: Path) -> Iterator[None]:
    """Around reading a run's exported model: a missing or broken file becomes one clear error."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"no usable exported model in {model_dir} ({e}); did the run finish?") from None
