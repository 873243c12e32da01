"""The global batch, the optimizer steps of an epoch, and the learning rate at each step."""

from __future__ import annotations

import math

from ddl_apps.core import sharding
from ddl_apps.errors import DataError, RecipeError
from ddl_apps.recipe import OptimConfig, Recipe


def epoch_steps(recipe: Recipe, train_examples: int, size: int) -> tuple[int, int]:
    """The global batch and the optimizer steps per epoch; a clear error when not even one step fits."""
    optim, workers = recipe.optim, recipe.dist.batch_workers or size
    global_batch = optim.batch_size * workers * optim.accumulation
    steps = sharding.steps_per_epoch(train_examples, global_batch)
    if steps == 0:
        raise DataError(
            f"the training set ({train_examples} examples) is smaller than one global step "
            f"(batch_size {optim.batch_size} x {workers} workers x accumulation {optim.accumulation}); "
            "lower optim.batch_size or use more data"
        )
    if global_batch < size:
        raise RecipeError(f"the global batch ({optim.batch_size} x {workers} workers x {optim.accumulation} = "
                          f"{global_batch} examples) is smaller than the {size} workers, so some would train on "
                          "nothing; raise dist.batch_workers (or leave it unset) or optim.batch_size")
    return global_batch, steps


def scaled_lr(optim: OptimConfig, size: int, scale: bool) -> float:
    return optim.lr * (size * optim.accumulation if scale else 1)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to 1, then constant, linear or cosine decay to 0 at `total` steps."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    decay = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}
    return warm * decay[schedule]
