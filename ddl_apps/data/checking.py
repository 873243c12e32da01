"""Checking a source's files once, while preparing: in parallel processes, in order, with a progress bar. Every bad
file is named at the end, in one error, instead of the first one in the middle of training."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from typing import Any

from ddl_apps.cpus import usable_cpus
from ddl_apps.data.progress import progress
from ddl_apps.errors import DataError

BATCH = 256  # items handed to a checking process at a time
SHOWN = 10  # bad files named in the error (and how many more there are)


class FileChecks:
    """A pool of checking processes (spawned: the caller may hold framework threads) and the bad files found."""

    def __init__(self, kind: str):
        self.kind = kind  # "image", "audio": what the error calls the files
        self.bad: list[str] = []  # "file: what is wrong with it", for each bad file
        self._pool = ProcessPoolExecutor(usable_cpus(), mp_context=get_context("spawn"))

    def __enter__(self) -> FileChecks:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(cancel_futures=True)

    def results(self, check: Callable[[Any], list[Any]], items: Sequence[Any] | Any, label: str
                ) -> Iterator[list[Any]]:
        """`check` (a module-level function: it runs in another process) on batches of `items`, which returns one
        result per item, or a text saying what is wrong with it: the results, batch after batch in order, while no
        item was bad. Once one is, the others are still checked (to name them all), not handed out."""
        batches = [items[start : start + BATCH] for start in range(0, len(items), BATCH)]
        for result in progress(self._pool.map(check, batches), len(items), label):
            self.bad += [r for r in result if isinstance(r, str)]
            if not self.bad:
                yield result

    def files(self, check: Callable[[str], Any], paths: Sequence[str], label: str) -> Iterator[list[Any]]:
        """`results` of `check(path)` on each file (a module-level function; a DataError or any other exception
        it raises says what is wrong with the file)."""
        return self.results(partial(_check_each, check), paths, label)

    def raise_if_bad(self) -> None:
        if self.bad:
            more = f" (and {len(self.bad) - SHOWN} more)" if len(self.bad) > SHOWN else ""
            raise DataError(f"{len(self.bad)} {self.kind} file(s) cannot be used: " + "; ".join(self.bad[:SHOWN]) +
                            f"{more}. Remove or replace them, then prepare again")


def _check_each(check: Callable[[str], Any], paths: Sequence[str]) -> list[Any]:
    """`check` on each path, or the text of what it raised (named after the file unless a DataError names it)."""
    results = []
    for path in paths:
        try:
            results.append(check(path))
        except DataError as e:
            results.append(str(e))
        except Exception as e:  # decoders raise many kinds for a broken file: OSError, SyntaxError, ValueError...
            results.append(f"{path}: {e}")
    return results
