"""What the trainers share for the files users hand them: reading tables and checking their columns, checking
the inputs of `ddl predict` (images, audio) and printing its rows."""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ddl_apps.errors import DataError

TEXT_TABLES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None, ".json": None}  # suffix -> separator


def read_text_table(path: Path, source_hint: str) -> pd.DataFrame:
    """A CSV / TSV (every cell read as text, so 'NA' stays a word and '007' an id) or JSON-lines file;
    `source_hint` says what data.source may name instead, for the error when the file is missing."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; set data.source to {source_hint}")
    suffix = path.suffix.lower()
    if suffix not in TEXT_TABLES:
        raise DataError(f"cannot tell the format of {path}: name it .csv, .tsv or .jsonl")
    try:
        if TEXT_TABLES[suffix] is None:
            return pd.read_json(path, lines=True, dtype=False)
        return pd.read_csv(path, sep=TEXT_TABLES[suffix], dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises many kinds for a broken file
        kind = "JSON lines (one object per line)" if TEXT_TABLES[suffix] is None else suffix[1:].upper()
        raise DataError(f"cannot read {path} as {kind}: {e}") from None


def as_strings(column: pd.Series) -> pd.Series:
    """Cells as stripped text; missing cells (NaN, None, null) become ''."""
    return column.map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip())


def check_columns(frame: pd.DataFrame, wanted: list[str], source: object, fix: str) -> None:
    """One DataError naming every missing column (with the closest one the data has), the data's columns (the
    first 20), and `fix`: which recipe settings choose the columns."""
    columns = [str(c) for c in frame.columns]
    missing = [c for c in wanted if c not in frame.columns]
    if not missing:
        return
    named = []
    for column in missing:
        close = difflib.get_close_matches(column, columns, 1)
        named.append(f"{column!r} (did you mean {close[0]!r}?)" if close else repr(column))
    listed = ", ".join(map(repr, columns[:20])) + (f", ... ({len(columns)} in all)" if len(columns) > 20 else "")
    has = f"its columns are {listed}" if columns else "it has no columns at all (is it empty?)"
    raise DataError(f"{source} has no column {', '.join(named)}; {has}. {fix}")


def file_identity(source: str, shipped: bool) -> dict[str, Any]:
    """What a prepared copy of `source` is made from: a shipped dataset's name (its package version is pinned), or a
    file's path, size and modification time (so an edited file is prepared again)."""
    path = Path(source).resolve()
    if shipped or not path.exists():
        return {"source": source if shipped else str(path)}  # (preparing names a missing file)
    stat = path.stat()
    return {"source": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def files_digest(paths: Iterable[Path], root: Path, contents: bool = False) -> str:
    """A digest of files by where they lie under `root`, their sizes and modification times (with `contents`,
    their bytes instead, for small files copied with their times kept): a file moved to another folder, renamed,
    re-recorded or edited changes it."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        stat = path.stat()
        mark = hashlib.sha256(path.read_bytes()).hexdigest() if contents else f"{stat.st_size}|{stat.st_mtime_ns}"
        digest.update(f"{path.relative_to(root)}|{mark}\n".encode())
    return digest.hexdigest()


def existing_files(inputs: list[str], kind: str) -> list[Path]:
    """The inputs as paths, or one DataError naming every input that is not a file."""
    files = [Path(f) for f in inputs]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"no such {kind} file: {', '.join(missing)}")
    return files


def print_rows(header: list[str], rows: list[list[str]], output: Path | None) -> None:
    """Tab-separated rows on stdout; with an output path, also into that file under a header line."""
    lines = ["\t".join(row) for row in rows]
    print("\n".join(lines))
    if output is not None:
        output.write_text("\n".join(["\t".join(header), *lines]) + "\n")
