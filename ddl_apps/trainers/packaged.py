"""Data files that PyPI packages ship, read from the installed package (never copied into the repository)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ddl_apps.errors import DataError


def packaged_file(package: str, relative: str, what: str) -> Path:
    """`relative` inside the installed `package`, found without importing it: such data-only packages are
    installed without their dependencies, so importing them would fail. `what` names the data (and the
    alternative) in the error when the package is missing."""
    spec = importlib.util.find_spec(package)
    folder = next(iter(spec.submodule_search_locations or []), None) if spec else None
    path = Path(folder) / relative if folder else None
    if path is None or not path.is_file():
        raise DataError(f"{what} comes from the {package} package, which is not installed (or lacks {relative}); "
                        "run 'make setup'")
    return path
