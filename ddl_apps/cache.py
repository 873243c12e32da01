"""Where prepared data lives between runs (never in the repository): $DDL_CACHE or ~/.cache/ddl_apps."""

import fcntl
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def cache_dir(*parts: str) -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddl_apps"
    root = Path(os.environ.get("DDL_CACHE") or default)
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_once(target: Path, build: Callable[[], object]) -> Path:
    """`target` (a file or folder in the cache), made by `build()` if it is missing. The workers of a run (and
    concurrent runs) on one host take turns on a lock file beside it: the first builds, the others wait and find
    it built. No collective, so a worker joining an elastic run mid-training can call it too. `build` must create
    `target` atomically (write elsewhere, then rename)."""
    if target.exists():
        return target
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        if not target.exists():
            build()
    return target


def build_again(target: Path, damaged: Callable[[], bool], build: Callable[[], object]) -> Path | None:
    """Set `target` aside (renamed `.NAME.damaged-TIME`) and build it again, under the lock build_once takes, unless
    it is no longer `damaged()` (another worker of the host found it damaged first and built it again). Where the
    damaged one went, or None."""
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists() and not damaged():
            return None
        aside = target.with_name(f".{target.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        if target.exists():
            target.rename(aside)
        build()
    return aside


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks (datasets and checkpoints can be large)."""
    with path.open("rb") as f:
        return stream_sha256(f)


def stream_sha256(f: BinaryIO) -> str:
    """The SHA-256 of what is left to read in a binary file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()
