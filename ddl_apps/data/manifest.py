"""A prepared dataset's manifest (`manifest.json`, written last: a folder without one is not a dataset): where each
split's shards are, the byte range, rows and SHA-256 of each chunk (one Arrow record batch) in them, the columns,
what the data was prepared from, and what was fitted on the training split."""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from typing import Any

from pydantic import BaseModel, ValidationError

from ddl_apps.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "ddl_apps.prepared/2"


def ddl_apps_version() -> str:
    return version("ddl_apps")


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Chunk(BaseModel):
    offset: int
    length: int
    rows: int
    sha256: str


class Shard(BaseModel):
    file: str
    bytes: int
    sha256: str
    rows: int
    chunks: list[Chunk]


class File(BaseModel):
    """A file beside the shards that a trainer reads whole (an index, a catalogue)."""

    bytes: int
    sha256: str


class Column(BaseModel):
    dtype: str
    shape: list[int]  # of one example; [] for a scalar


class Manifest(BaseModel):
    format: str
    ddl_apps: str
    trainer: str
    settings: dict[str, Any]  # what the data was prepared with: the recipe's data section (less reading options)
    settings_digest: str
    source: dict[str, Any]  # what the source was when prepared (path, size, modification time)
    columns: dict[str, dict[str, Column]]  # by split
    splits: dict[str, list[Shard]]
    fitted: dict[str, Any]  # the preprocessing fitted on the training split
    files: dict[str, File] = {}

    def rows(self, split: str) -> int:
        return sum(shard.rows for shard in self.splits[split])

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def parse(cls, text: bytes, where: str) -> Manifest:
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise DataError(f"{where} is not a valid manifest ({e}); prepare the dataset again (ddl data prepare)") \
                from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else None
            raise DataError(f"{where} is not a ddl_apps prepared dataset of format {FORMAT} (it says {found!r}); "
                            "prepare the dataset again (ddl data prepare)")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise DataError(f"{where} is damaged ({e.errors()[0]['loc']}: {e.errors()[0]['msg']}); prepare the "
                            "dataset again (ddl data prepare)") from None

    def check(self, where: str, trainer: str, settings: dict[str, Any], columns: dict[str, dict[str, str]]) -> None:
        """Refuse data prepared for another trainer, another data section or another version of ddl_apps, or whose
        columns are not the ones the trainer reads."""
        fix = "prepare it again with this recipe (ddl data prepare RECIPE -o DIR), or point data.prepared elsewhere"
        if self.trainer != trainer:
            raise DataError(f"{where} was prepared for the {self.trainer!r} trainer, not {trainer!r}; {fix}")
        if self.ddl_apps != ddl_apps_version():
            raise DataError(f"{where} was prepared by ddl_apps {self.ddl_apps}, and this is {ddl_apps_version()}; "
                            f"{fix}")
        if self.settings_digest != settings_digest(settings):
            changed = sorted(k for k in {*settings, *self.settings} if settings.get(k) != self.settings.get(k))
            raise DataError(f"{where} was prepared with other data settings than this recipe's (differing: "
                            f"{', '.join(changed) or 'their digest'}); {fix}")
        found = {split: {name: c.dtype for name, c in held.items()} for split, held in self.columns.items()}
        for split, wanted in columns.items():
            if found.get(split) != wanted:
                raise DataError(f"{where} holds {split} columns {found.get(split)}, and the trainer reads {wanted}; "
                                f"{fix}")
