"""A progress bar on stderr for long preparation passes (quiet when stderr is not a terminal, as in CI logs), and
messages about the data."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from ddl_apps.console import stderr_console

Item = TypeVar("Item")


def progress(items: Iterable[Item], total_rows: int, what: str) -> Iterator[Item]:
    """`items` (tables of rows, each with a len), counted against `total_rows` on a bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = stderr_console()
    columns: list[Any] = [TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                          TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task(what, total=total_rows)
        for item in items:
            yield item
            bar.advance(task, len(item))  # type: ignore[arg-type]


def message(text: str) -> None:
    """One line on stderr, kept whole (paths in it stay greppable)."""
    stderr_console().print(text, highlight=False, markup=False)
