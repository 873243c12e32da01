"""The console on stderr that the messages, tables and progress bars of ddl_apps go through."""

from __future__ import annotations

import os

from rich.console import Console

WIDE = 1000  # columns of a console that is not a terminal: a line or a table is as wide as it needs


def stderr_console() -> Console:
    """Rich's console on stderr, lines kept whole (paths in them stay greppable). Where stderr is not a terminal (a
    log file under SLURM, a pipe to horovodrun), rich would cut tables to 80 columns (`recall…`): they get the width
    of the terminal `ddl train` was started from (COLUMNS, which the launcher passes on to its workers), or all
    they need. Rich writes no control codes where there is no terminal."""
    width = None if Console(stderr=True).is_terminal or "COLUMNS" in os.environ else WIDE
    return Console(stderr=True, soft_wrap=True, width=width)
