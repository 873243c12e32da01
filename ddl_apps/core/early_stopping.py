"""Early stopping (`run.early_stopping`): after each epoch's evaluation, whether the validation metric the recipe
watches improved; the best state's weights kept in memory on every rank; the run stops once `patience`
evaluations in a row brought no improvement, and exports the best state. Its state goes into every checkpoint and
elastic commit, so a resumed or resized run stops where an uninterrupted one does, and exports the same weights."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddl_apps.core import checkpoint as ckpt
from ddl_apps.errors import RecipeError
from ddl_apps.recipe import EarlyStoppingConfig

STATE = "early_stopping"  # its files in a checkpoint: early_stopping.json and .safetensors


class EarlyStopping:
    def __init__(self, config: EarlyStoppingConfig):
        self.config = config
        self.best: float | None = None  # the best value of the metric so far
        self.best_epoch = self.best_step = 0  # when it was reached (epochs counted from 1)
        self.stale = 0  # evaluations since then
        self.weights: Any = None  # the engine's snapshot_weights() at the best evaluation (None before one)

    @property
    def stopped(self) -> bool:
        return self.stale >= self.config.patience

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        gain = value - self.best if self.config.mode == "max" else self.best - value
        return gain > self.config.min_delta

    def update(self, metrics: dict[str, float], epoch: int, step: int, snapshot: Callable[[], Any]) -> None:
        """Collective (snapshot is): take an evaluation's metrics, at the end of `epoch` (from 1), after `step`."""
        value = self.watched(metrics)
        if self.improves(value):
            self.best, self.best_epoch, self.best_step, self.stale = value, epoch, step, 0
            self.weights = snapshot()
        else:
            self.stale += 1

    def watched(self, metrics: dict[str, float]) -> float:
        if self.config.metric not in metrics:
            raise RecipeError(f"run.early_stopping.metric={self.config.metric!r} is not a validation metric of this "
                              f"recipe; it reports {', '.join(sorted(metrics))}: set run.early_stopping.metric to "
                              "one of them")
        return float(metrics[self.config.metric])

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.config.metric, "mode": self.config.mode, "best": self.best,
                "best_epoch": self.best_epoch, "best_step": self.best_step, "stale": self.stale,
                "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A saved state watching the same metric the same way (another, or none: start afresh)."""
        if state is None or (state["metric"], state["mode"]) != (self.config.metric, self.config.mode):
            state = EarlyStopping(self.config).state_dict()
        self.best, self.best_epoch, self.best_step = state["best"], state["best_epoch"], state["best_step"]
        self.stale, self.weights = state["stale"], state["weights"]

    def stop_message(self, epoch: int, epochs: int) -> str:
        return (f"early stopping: valid {self.config.metric} has not improved for {self.stale} evaluations; training "
                f"stops after epoch {epoch} of {epochs}")

    def restored_message(self) -> str:
        return (f"early stopping: the best state is restored and exported: valid {self.config.metric} = "
                f"{self.best:.6g} after epoch {self.best_epoch} (step {self.best_step})")

    def summary(self) -> dict[str, Any]:
        return {"metric": self.config.metric, "mode": self.config.mode, "patience": self.config.patience,
                "best": self.best, "best_epoch": self.best_epoch, "best_step": self.best_step,
                "stopped_early": self.stopped}


def save(state: EarlyStopping, folder: Path, files: ckpt.TensorFiles) -> None:
    ckpt.save_state(folder, STATE, state.state_dict(), files)


def read(folder: Path, files: ckpt.TensorFiles) -> dict[str, Any] | None:
    """A checkpoint's early-stopping state (None in one written without early stopping)."""
    return ckpt.load_state(folder, STATE, files) if (folder / f"{STATE}.json").exists() else None
