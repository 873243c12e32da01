"""Atomic, verifiable checkpoints.

A checkpoint is a folder `checkpoints/step-00000123/` holding tensors in safetensors files, the rest as JSON,
and `manifest.json` with the SHA-256 of every file. It is written under a temporary name, fsynced and renamed,
so a crash never leaves a half-written checkpoint under a real name. Loading verifies the checksums and falls
back to the newest good checkpoint. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from ddl_apps.cache import file_sha256
from ddl_apps.errors import CheckpointError

MANIFEST = "manifest.json"
PREFIX = "step-"
CORRUPT = "corrupt-"  # an unusable checkpoint that resume moved aside


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: Path, step: int, write_files: Callable[[Path], None], keep: int,
                     folder: Path | None = None, digests: dict[str, str] | None = None) -> Path:
    """Create `root/step-N` atomically: `write_files(tmp_dir)` fills it, then checksums, fsync, rename, prune.

    `folder` is a temporary folder begun with begin_checkpoint that other workers already wrote files into (their
    shards of the state), each fsynced, with their SHA-256 in `digests`.
    A folder already at step N is replaced by rename-then-delete, so a crash leaves the old one or the new one.
    Pruning keeps the `keep` newest checkpoints up to this one and never touches a newer one (a newer folder can
    only be one that resume could not use; set_aside moves those out of the way)."""
    final = root / f"{PREFIX}{step:08d}"
    tmp = folder or begin_checkpoint(root, step)
    try:
        write_files(tmp)
        known = digests or {}
        manifest = {"step": step, "files": {p.name: known.get(p.name) or file_sha256(p) for p in sorted(tmp.iterdir())}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for path in tmp.iterdir():
            if path.name not in known:
                fsync_file(path)
        os.chmod(tmp, 0o700)
        _replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    older = [p for p in list_checkpoints(root) if p.name < final.name]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def begin_checkpoint(root: Path, step: int) -> Path:
    """The temporary folder a checkpoint of `step` is written into (write_checkpoint renames it when complete)."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{PREFIX}{step:08d}.", dir=root))


def fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _replace(new: Path, final: Path) -> None:
    """Rename `new` to `final`; an existing `final` is renamed away first and deleted only afterwards."""
    if not final.exists():
        os.rename(new, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
    os.rename(final, old / final.name)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(old / final.name, final)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Completed checkpoints, oldest first (temporary folders start with a dot and are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def set_aside(checkpoint: Path) -> Path:
    """Move an unusable checkpoint out of the list (to `corrupt-step-N`, kept for inspection), so that pruning
    and the next resume no longer count it."""
    target = checkpoint.with_name(f"{CORRUPT}{checkpoint.name}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = checkpoint.with_name(f"{CORRUPT}{checkpoint.name}.{suffix}")
    os.rename(checkpoint, target)
    return target


def verify(checkpoint: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    for name, digest in manifest["files"].items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match its checksum (truncated or corrupt)"
    return None


def latest_valid(root: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies; newer corrupt ones are reported and moved aside (set_aside)."""
    for checkpoint in reversed(list_checkpoints(root)):
        problem = verify(checkpoint)
        if problem is None:
            return checkpoint
        aside = set_aside(checkpoint)
        warn(f"checkpoint {checkpoint} is unusable: {problem}; moved it to {aside.name} and trying the previous one")
    return None


@dataclass(frozen=True)
class TensorFiles:
    """How one framework's tensors are told apart from the rest of a nested state, and go into and out of a
    safetensors file."""

    is_tensor: Callable[[Any], bool]
    prepare: Callable[[Any], Any]  # a tensor (or numpy array) as it is saved: contiguous, in host memory
    save_file: Callable[[dict[str, Any], str], None]
    load_file: Callable[[str], dict[str, Any]]


NUMPY = TensorFiles(lambda obj: isinstance(obj, np.ndarray), np.ascontiguousarray, safetensors.numpy.save_file,
                    safetensors.numpy.load_file)


# Nested state (dicts with any keys, lists, tuples, tensors, numbers) <-> a JSON skeleton plus a flat tensor dict.
def split_tensors(obj: Any, files: TensorFiles, tensors: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    tensors = {} if tensors is None else tensors
    if files.is_tensor(obj) or isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = files.prepare(obj)
        return {"__tensor__": key}, tensors
    if isinstance(obj, dict):
        return {"__items__": [[k, split_tensors(v, files, tensors)[0]] for k, v in obj.items()]}, tensors
    if isinstance(obj, tuple):
        return {"__tuple__": [split_tensors(v, files, tensors)[0] for v in obj]}, tensors
    if isinstance(obj, list):
        return [split_tensors(v, files, tensors)[0] for v in obj], tensors
    if isinstance(obj, np.generic):
        return obj.item(), tensors
    return obj, tensors


def join_tensors(skeleton: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__tuple__" in skeleton:
        return tuple(join_tensors(v, tensors) for v in skeleton["__tuple__"])
    if isinstance(skeleton, dict):
        return {k: join_tensors(v, tensors) for k, v in skeleton["__items__"]}
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    return skeleton


def save_state(folder: Path, name: str, state: Any, files: TensorFiles = NUMPY) -> None:
    """Write nested state as `name.json` + `name.safetensors` (its tensors those of `files`' framework)."""
    skeleton, tensors = split_tensors(state, files)
    files.save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(folder: Path, name: str, files: TensorFiles = NUMPY) -> Any:
    try:
        skeleton = json.loads((folder / f"{name}.json").read_text())
        tensors = files.load_file(str(folder / f"{name}.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {name} from checkpoint {folder}: {e}") from None
    return join_tensors(skeleton, tensors)
