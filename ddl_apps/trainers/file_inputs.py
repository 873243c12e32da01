"""What the file-scoring `ddl predict` commands (images, audio) share: checking the inputs, printing the rows."""

from __future__ import annotations

from pathlib import Path

from ddl_apps.errors import DataError


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
