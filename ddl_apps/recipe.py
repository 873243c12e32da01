"""Recipes: a YAML file plus dotted overrides -> a validated, typed config, or one clear `RecipeError`.

A recipe has the sections every trainer shares (`optim`, `dist`, `run`) and two that belong to the trainer
(`data`, `model`), validated by the pydantic models the trainer declares.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ddl_apps.errors import RecipeError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class Section(BaseModel):
    # No inf or nan: the run directory's config.yaml (read back by eval and predict) could not hold them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0, description="learning rate for one worker; see dist.scale_lr")
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    batch_size: int = Field(64, gt=0, description="examples per worker per micro-batch")
    accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step (backward_passes_per_step)")
    epochs: int = Field(1, ge=1)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    clip_grad_norm: float | None = Field(None, gt=0)
    nonfinite: Literal["stop", "skip"] = Field("stop", description="a step whose loss or gradients are NaN or "
                                              "infinite: stop the run naming it, or skip it (PyTorch engine)")


TIMEOUT_S, ELASTIC_TIMEOUT_S = 30, 120  # dist.timeout_s's defaults


class DistConfig(Section):
    compression: Literal["none", "fp16"] = "none"
    controller: Literal["auto", "gloo", "mpi"] = Field(
        "auto", description="auto: MPI on one host (shared memory; see BENCHMARKS.md), Gloo across hosts and "
        "for --elastic")
    gradient_groups: int = Field(1, ge=0, description="PyTorch engine: gradients are allreduced in this many fused "
                                 "groups, each once all its gradients are ready; 0: each tensor as soon as it is "
                                 "ready (Horovod's default: more negotiation rounds, more overlap)")
    scale_lr: bool = Field(True, description="multiply lr by workers x accumulation")
    batch_workers: int | None = Field(None, ge=1, description="the global batch is batch_size x this x accumulation; "
                                      "default: the number of workers. `ddl train --elastic` sets it to --max-np, "
                                      "so workers leaving or joining change neither the batch nor the lr")
    zero: Literal[0, 1, 2, 3] = Field(0, description="PyTorch engine: ZeRO stage. 1 shards the optimizer state "
                                      "across the workers, 2 also the gradients, 3 also the parameters (gathered "
                                      "module by module for each pass); 0: every worker holds everything")
    zero_bucket_mb: float = Field(4.0, gt=0, description="dist.zero: the size of the units the parameters are "
                                  "flattened into (one collective each); stage 3 gathers a module once its "
                                  "parameters reach it")
    cycle_time_ms: float = Field(5.0, gt=0, description="how often Horovod's background thread negotiates; "
                                 "longer suits long steps (HOROVOD_CYCLE_TIME in the environment wins)")
    timeout_s: int | None = Field(None, ge=1, description="how long a collective waits for the other workers: how "
                                  "soon a dead host or a network partition is noticed (Gloo; MPI has none); default "
                                  "30, under --elastic 120 (there the others also wait this long for a worker that "
                                  "replaces a lost one to start); HOROVOD_GLOO_TIMEOUT_SECONDS in the environment wins")

    def collective_timeout_s(self, elastic: bool) -> int:
        return self.timeout_s or (ELASTIC_TIMEOUT_S if elastic else TIMEOUT_S)


class EarlyStoppingConfig(Section):
    metric: str = Field(description="the validation metric to watch (a key of the run's 'valid' metrics, e.g. "
                        "pr_auc or accuracy)")
    mode: Literal["max", "min"] = Field("max", description="max: higher is better; min: lower is better (a loss)")
    patience: int = Field(3, ge=1, description="stop after this many evaluations in a row without an improvement")
    min_delta: float = Field(0.0, ge=0, description="an improvement must beat the best by more than this")


class RunConfig(Section):
    dir: str | None = Field(None, description="run directory; default runs/<recipe>-<time>")
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    log_every: int = Field(10, ge=1)
    eval_every_epoch: bool = True
    early_stopping: EarlyStoppingConfig | None = Field(
        None, description="evaluate after every epoch, stop when the metric has stopped improving, and export the "
        "best state (docs/launching.md#early-stopping); none: train every epoch and export the last state")
    checkpoint_every: int | None = Field(None, ge=1, description="steps between checkpoints; default each epoch")
    keep_checkpoints: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop (with a checkpoint) after this many steps")
    progress: bool = True
    mlflow: bool = Field(False, description="track the run in MLflow (rank 0): in the local store ./mlruns/, or "
                         "at MLFLOW_TRACKING_URI, which turns tracking on by itself (docs/tracking.md)")


class Recipe(Section):
    trainer: str
    description: str = ""
    data: Any = Field(default_factory=dict, description="the trainer's DataConfig once loaded")
    model: Any = Field(default_factory=dict, description="the trainer's ModelConfig once loaded")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    dist: DistConfig = Field(default_factory=DistConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    name: str = Field("", description="the recipe's name (its file stem), set by the loader")

    @field_validator("trainer")
    @classmethod
    def _known_trainer(cls, trainer: str) -> str:
        from ddl_apps.registry import RENAMED, find_trainer, registered

        if find_trainer(trainer) is None:
            raise ValueError(f"unknown trainer{_suggest(trainer, registered())}")
        return RENAMED.get(trainer, trainer)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(sorted(choices))}"


_SHORT = reprlib.Repr()  # a bad value as an error shows it: long text, lists and nesting cut short
_SHORT.maxstring = _SHORT.maxother = 60


def _describe(error: ValidationError, prefix: str, model: type[BaseModel]) -> str:
    """One line per problem, with the dotted key and, for unknown keys, the closest known one."""
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        if e["type"] == "extra_forbidden":
            parent = model
            for part in e["loc"][:-1]:
                field = parent.model_fields.get(str(part))
                parent = field.annotation if field and isinstance(field.annotation, type) else parent
            known = parent.model_fields if hasattr(parent, "model_fields") else {}
            lines.append(f"  - {where}: unknown key{_suggest(str(e['loc'][-1]), known)}")
        elif e["type"] == "missing":
            lines.append(f"  - {where}: {e['msg']}")
        else:
            lines.append(f"  - {where}: {e['msg']} (got {_SHORT.repr(e.get('input'))})")
    return "\n".join(lines)


_EXPONENT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _scalar(raw: str) -> Any:
    """A YAML value, except that 3e-4 is a number (YAML 1.1 reads it as text)."""
    if _EXPONENT_NUMBER.fullmatch(raw):
        return float(raw)
    try:
        return yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return raw


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`optim.lr=3e-4 dist.compression=fp16` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=3e-4)")
        value = _scalar(raw)
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r} conflicts with another override of {part!r}")
        node[leaf] = value
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def recipe_files() -> dict[str, Path]:
    """The recipes by name: the shipped ones (recipes/) and those of installed trainer packages."""
    from ddl_apps.registry import recipe_folders

    return {p.stem: p for folder in (RECIPES_DIR, *recipe_folders()) for p in sorted(folder.glob("*.yaml"))}


def resolve_path(recipe: str | Path) -> Path:
    """A recipe is a path to a YAML file, or the name of one that `ddl recipes` lists."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist; 'ddl recipes' lists the shipped ones")
        return path
    known = recipe_files()
    if str(recipe) not in known:
        raise RecipeError(f"no recipe named {recipe!r}{_suggest(str(recipe), known)}")
    return known[str(recipe)]


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except RecursionError:
        raise RecipeError(f"recipe {path} is nested too deeply to be a recipe; check its brackets") from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping with a 'trainer:' key, not {type(raw).__name__}")
    return raw


def load_recipe(recipe: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load, override and validate a recipe, including the trainer's own data and model sections.

    Every problem found is reported in the one RecipeError."""
    from ddl_apps.registry import find_trainer

    path = resolve_path(recipe)
    raw = _merge(read_yaml(path), parse_overrides(list(overrides)))
    raw.setdefault("name", path.stem)
    problems, config, sections = [], None, {}
    try:
        config = Recipe.model_validate(raw)
    except ValidationError as e:
        problems.append(_describe(e, "", Recipe))
    trainer = find_trainer(raw["trainer"]) if isinstance(raw.get("trainer"), str) else None
    if trainer is not None:
        for section, schema in (("data", trainer.data_config), ("model", trainer.model_config)):
            try:
                sections[section] = schema.model_validate(raw.get(section) or {})
            except ValidationError as e:
                problems.append(_describe(e, section, schema))
    if problems:
        raise RecipeError(f"recipe {path} is invalid:\n" + "\n".join(problems))
    assert config is not None, "a recipe that failed validation has problems"
    for section, value in sections.items():
        setattr(config, section, value)
    return config


def list_recipes() -> dict[str, str]:
    """Recipe names (shipped and installed) and their one-line descriptions."""
    return {name: str(read_yaml(path).get("description", "")) for name, path in sorted(recipe_files().items())}
