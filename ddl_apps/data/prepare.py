"""`ddl data prepare`, and `data.prepared: auto`: one pass over a recipe's source that writes a prepared dataset,
to a local folder or object storage, so that nothing looks complete until everything is (the manifest comes last).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddl_apps.cache import build_again, build_once, cache_dir
from ddl_apps.data.config import AUTO, READING_OPTIONS
from ddl_apps.data.dataset import PreparedDataset, stamp_verified
from ddl_apps.data.manifest import FORMAT, MANIFEST, Column, File, Manifest, ddl_apps_version, settings_digest
from ddl_apps.data.progress import message as progress_message
from ddl_apps.data.shards import Columns, SplitWriter, columns_of, row_bytes
from ddl_apps.data.store import Store, is_remote
from ddl_apps.errors import DataError

if TYPE_CHECKING:
    from ddl_apps.core.contract import Preparer
    from ddl_apps.recipe import Recipe

CHUNK_BYTES = 1 << 20  # one read (and one cache file) each: large enough for object storage, small for memory
CHUNKS_PER_SHARD = 256


def preparation_settings(recipe: Recipe, preparer: Preparer) -> dict[str, Any]:
    """What the prepared data depends on: the data section less its reading options and what the trainer reads at
    training, and what the trainer adds."""
    return {**recipe.data.model_dump(exclude=READING_OPTIONS | preparer.read_at_training),
            **preparer.depends_on(recipe)}


def run_seed(recipe: Recipe) -> dict[str, Any]:
    """A Preparer's `depends_on` for data whose split, sample or shuffle the run's seed draws."""
    return {"seed": recipe.run.seed}


class DatasetWriter:
    """Splits written batch by batch into a staging folder; see SplitWriter."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.columns: dict[str, dict[str, Column]] = {}
        self._plans: dict[str, tuple[int, int | None]] = {}
        self._splits: dict[str, SplitWriter] = {}
        self.files: dict[str, File] = {}

    def plan(self, split: str, rows: int, shuffle_seed: int | None = None) -> None:
        """Say before adding rows how many `split` will get, and whether to shuffle them (training splits)."""
        self._plans[split] = (rows, shuffle_seed)

    def add(self, split: str, batch: Columns) -> None:
        if split not in self._splits:
            columns = self.columns[split] = columns_of(batch)
            chunk_rows = max(1, int(CHUNK_BYTES // max(1.0, row_bytes(batch))))
            rows, seed = self._plans.get(split, (0, None))
            self._splits[split] = SplitWriter(self.folder, split, columns, chunk_rows, chunk_rows * CHUNKS_PER_SHARD,
                                              rows, seed)
        self._splits[split].add(batch)

    def add_file(self, name: str, data: bytes) -> None:
        """A file beside the shards, read whole by the trainer (PreparedDataset.file)."""
        (self.folder / name).write_bytes(data)
        self.files[name] = File(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    def finish(self) -> dict[str, Any]:
        return {name: writer.finish() for name, writer in self._splits.items()}


def prepare(recipe: Recipe, preparer: Preparer, location: str | None) -> str:
    """Prepare the recipe's data at `location` (a folder or URL; None: the cache, reused while the source and the
    settings are unchanged). Returns where it is."""
    if location is None:
        key = settings_digest({"settings": preparation_settings(recipe, preparer), "source": preparer.source(recipe),
                               "format": FORMAT, "ddl_apps": ddl_apps_version()})  # a new version prepares anew
        target = cache_dir("prepared", recipe.trainer) / key
        build_once(target, lambda: _write_local(recipe, preparer, target))
        return str(target)
    if is_remote(location):
        _write_remote(recipe, preparer, location)
    else:
        _write_local(recipe, preparer, Path(location))
    return location


def _write(recipe: Recipe, preparer: Preparer, folder: Path) -> None:
    """The dataset's files into `folder`, the manifest last."""
    writer = DatasetWriter(folder)
    fitted = preparer.write(recipe, writer)
    splits = writer.finish()
    settings = preparation_settings(recipe, preparer)
    manifest = Manifest(format=FORMAT, ddl_apps=ddl_apps_version(), trainer=recipe.trainer, settings=settings,
                        settings_digest=settings_digest(settings), source=preparer.source(recipe),
                        columns=writer.columns, splits=splits, fitted=fitted, files=writer.files)
    (folder / MANIFEST).write_text(manifest.to_json())


def _check_replaceable(target: Path) -> None:
    """A folder -o may replace: missing, empty, or a prepared dataset of this format (anything else holds files of
    the user's, which replacing would delete)."""
    if not target.exists() or not any(target.iterdir()):
        return
    try:
        Manifest.parse((target / MANIFEST).read_bytes(), str(target / MANIFEST))
    except (OSError, DataError):
        raise DataError(f"{target} exists and is not a prepared dataset of format {FORMAT} (no {MANIFEST} of this "
                        "format in it), so preparing into it would delete what it holds; nothing was changed. "
                        "Choose a new or empty folder for -o") from None


def _write_local(recipe: Recipe, preparer: Preparer, target: Path) -> None:
    """Write beside `target` and rename: a failed prepare removes its hidden partial folder, a killed one leaves it
    (removed by the next prepare), never a folder that looks complete; an existing dataset is replaced only once
    the new one is whole."""
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write(recipe, preparer, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)
    stamp_verified(target, PreparedDataset(str(target)).stored())


def _write_remote(recipe: Recipe, preparer: Preparer, location: str) -> None:
    """Prepare in a local staging folder, then upload the shards and, last, the manifest."""
    store = Store(location)
    staging = cache_dir("staging") / settings_digest({"location": location})
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write(recipe, preparer, staging)
        store.attempt(MANIFEST, lambda _: _upload(store, staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _upload(store: Store, staging: Path) -> None:
    manifest = f"{store.root}/{MANIFEST}"
    if store.fs.exists(manifest):  # the old dataset stops looking complete before any of it is replaced
        store.fs.rm_file(manifest)
    for path in sorted(staging.iterdir()):
        if path.name != MANIFEST:
            store.fs.put_file(str(path), f"{store.root}/{path.name}")
    store.fs.put_file(str(staging / MANIFEST), manifest)


def open_prepared(recipe: Recipe, preparer: Preparer) -> PreparedDataset:
    """The recipe's prepared dataset, made first when `data.prepared` is auto, checked against the recipe. One made
    by `auto` and found damaged is set aside and prepared again (the cache's key covers the settings and the
    version, so a failed check can only be damage)."""
    cfg = recipe.data
    if cfg.prepared != AUTO:
        return _opened(cfg.prepared, recipe, preparer)
    location = prepare(recipe, preparer, None)
    try:
        return _opened(location, recipe, preparer)
    except DataError as damage:
        def damaged() -> bool:
            try:
                _opened(location, recipe, preparer)
            except DataError:
                return True
            return False

        aside = build_again(Path(location), damaged, lambda: _write_local(recipe, preparer, Path(location)))
        if aside is not None:
            progress_message(f"the prepared dataset {location} was damaged ({damage}); it was moved to {aside} and "
                             "prepared again (delete that folder once you have looked at it)")
        return _opened(location, recipe, preparer)


def _opened(location: str, recipe: Recipe, preparer: Preparer) -> PreparedDataset:
    dataset = PreparedDataset(location, int(recipe.data.cache_gb * 2**30))
    dataset.manifest.check(dataset.where, recipe.trainer, preparation_settings(recipe, preparer), preparer.columns)
    dataset.verify()
    return dataset
