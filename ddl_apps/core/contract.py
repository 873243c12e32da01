"""The trainer contract: what a trainer package provides, checked by a type checker.

A trainer package exports `TRAINER`, a `Trainer`: its name, its engine, the schemas of its recipes' `data` and
`model` sections, and where its `TrainerHooks` live. The hooks (building the task, `ddl predict`, `ddl recommend`)
sit in a module of their own that imports the frameworks, so that validating a recipe or listing recipes does not.
Trainers register under the entry-point group `ddl_apps.trainers` (see ddl_apps/registry.py).

A task is a `TorchTask` or a `KerasTask`; subclass one to inherit the optional hooks' defaults. Its splits are
`BatchSource`s, read by index; its training split may instead be a `StreamSource`, which hands
each worker only its own examples, so that no worker needs the whole dataset.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, Union, runtime_checkable

import numpy as np
from pydantic import BaseModel

if TYPE_CHECKING:
    from ddl_apps.core.dist import Topology
    from ddl_apps.data.prepare import DatasetWriter
    from ddl_apps.recipe import Recipe

ENTRY_POINTS = "ddl_apps.trainers"


@runtime_checkable
class BatchSource(Protocol):
    """A split read by index: its length, and the batch of given example indices (columns of equal length).
    A source may also have `lengths` (one number per example): training batches are then bucketed by length."""

    def __len__(self) -> int: ...
    def take(self, indices: np.ndarray) -> dict[str, Any]: ...


@runtime_checkable
class StreamSource(Protocol):
    """A training split streamed to each worker. `examples`: how many an epoch has (a prepared dataset's manifest
    knows), which sizes the epoch and the learning-rate schedule. `rank_steps` yields, for each global step of
    `epoch` from step `first` on, worker `rank`'s micro-batches (`micro_batches` of them, fewer only when its
    share is smaller) of its share of the step's `global_batch` examples. The examples of a global step, and
    their order, must not depend on the number of workers: then a run on 2 workers trains as one on 1 with the
    combined batch, and a run resumed at (epoch, step) or resized by elastic training goes on with the examples
    an uninterrupted run would see. core/sharding.py's rank_step_batches cuts a step's examples that way."""

    examples: int

    def rank_steps(self, epoch: int, first: int, global_batch: int, rank: int, size: int,
                   micro_batches: int) -> Iterator[list[dict[str, Any]]]: ...


class BaseTask(Protocol):
    """What every task provides. `predict` returns per-example arrays; `metrics` sees a whole split, gathered from
    every rank in order; `report` adds results besides the model's (baselines) to the run's summary."""

    train: BatchSource | StreamSource
    valid: BatchSource
    test: BatchSource | None

    def build_model(self) -> Any: ...
    def predict(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]: ...
    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]: ...
    def export(self, model: Any, model_dir: Path) -> None: ...

    def report(self) -> dict[str, dict[str, float]]:
        return {}

    def write_artifacts(self, run_dir: Path, outputs: dict[str, np.ndarray]) -> None:
        """Rank 0, at the end of a run: files made from the final split's predictions (a plot, a table)."""
        return None

    def tracked_model(self, model: Any, batch: dict[str, Any]) -> TrackedModel | None:
        """The exported model as experiment tracking logs it, with `batch` (a few examples of the final split) as
        its input example; None (the default): its exported files (model/) instead."""
        return None


@dataclass(frozen=True)
class TrackedModel:
    """A model as MLflow logs it (core/tracking.py): `model` in MLflow's `flavour`, `example` the model's inputs for
    a few examples as the flavour's predict takes them (the input example, which the signature is inferred from),
    for the transformers flavour its pipeline `task` (e.g. "text-classification"), and for the pytorch flavour the
    `variable_axes` besides the batch whose size may differ from the example's, in the input and the output alike
    (an audio length)."""

    flavour: Literal["pytorch", "keras", "transformers"]
    model: Any
    example: Any
    task: str | None = None
    variable_axes: tuple[int, ...] = ()


class TorchTask(BaseTask, Protocol):
    """A task for the PyTorch engine: `loss(model, batch)` is the batch's mean loss, a scalar tensor."""

    def loss(self, model: Any, batch: dict[str, Any]) -> Any: ...


class KerasTask(BaseTask, Protocol):
    """A task for the Keras engine: `loss` is a Keras loss; `train` has columns `x` and `y` for the tf.data
    pipeline, or is a StreamSource whose micro-batches `decode(columns)` turns into numpy (x, y) in that pipeline's
    parallel map (encoded images decoded and resized there). `augment(x, y, seed)`, when set, transforms each
    training batch in that pipeline, drawing at random only from the stateless seed given (a [2] int64 tensor), so
    a resumed run draws what the first one drew."""

    loss: Any
    augment: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None
    decode: Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]] | None = None


Task = Union[TorchTask, KerasTask]  # noqa: UP007 (a runtime alias of Protocols)


@dataclass(frozen=True)
class Preparer:
    """How a trainer prepares its data once (`ddl data prepare`; ddl_apps/data). `source(recipe)` says cheaply what
    the data would be read from (a file's path, size and modification time), so a prepared copy in the cache is
    reused while it is unchanged; `write(recipe, writer)` reads the source in bounded memory, writes the splits'
    rows to `writer`, and returns what it fitted on the training split (JSON); `columns`: for each split, name ->
    numpy dtype of the columns written ("str" for text); `depends_on(recipe)`: what the prepared data depends on
    besides the recipe's data section (the seed that draws a random split, a tokenizer), so that a change to it
    prepares anew; `read_at_training`: the data settings it does not depend on (what training does with the rows:
    resizing, augmentation), which change without preparing anew."""

    source: Callable[[Recipe], dict[str, Any]]
    write: Callable[[Recipe, DatasetWriter], dict[str, Any]]
    columns: dict[str, dict[str, str]]
    depends_on: Callable[[Recipe], dict[str, Any]] = lambda recipe: {}
    read_at_training: frozenset[str] = frozenset()


@dataclass(frozen=True)
class TrainerHooks:
    """What training and the trainer's commands call: `build_task(recipe, topology)` reads the data (bad data
    fails here, with a DataError, before the run writes anything); `predict(run_dir, inputs, output)` is
    `ddl predict`; `recommend(run_dir, user_id, k)`, if any, is `ddl recommend`; `export_onnx(model_dir, output)`,
    if any, is `ddl export --format onnx`: it writes the exported model as an ONNX file and returns the largest
    absolute difference of its outputs from the framework's on an example batch; `prepare`, if any, makes the
    prepared dataset `build_task` reads."""

    build_task: Callable[[Recipe, Topology], Task]
    predict: Callable[[Path, list[str], Path | None], None] | None = None
    recommend: Callable[[Path, str, int], None] | None = None
    prepare: Preparer | None = None
    export_onnx: Callable[[Path, Path], float] | None = None


@dataclass(frozen=True)
class Trainer:
    """A trainer as recipes and the launcher see it, without importing a framework. `hooks` is the
    "module:attribute" of its TrainerHooks; `recipes`, a folder of recipe YAML files that `ddl recipes` lists."""

    name: str
    engine: Literal["torch", "keras"]
    data_config: type[BaseModel]
    model_config: type[BaseModel]
    hooks: str
    recipes: Path | None = None

    def load_hooks(self) -> TrainerHooks:
        module, _, attribute = self.hooks.partition(":")
        hooks = getattr(importlib.import_module(module), attribute or "HOOKS", None)
        if not isinstance(hooks, TrainerHooks):
            raise TypeError(f"trainer {self.name!r}: {self.hooks} is not a TrainerHooks")
        return hooks
