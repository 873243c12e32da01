"""Where prepared data lives between runs (never in the repository): $DDL_CACHE or ~/.cache/ddl_apps."""

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddl_apps"
    root = Path(os.environ.get("DDL_CACHE") or default)
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
