"""Where a prepared dataset lives: a local folder or an fsspec URL (`s3://bucket/prefix`), read by byte range.
Pieces read from remote storage are kept in a size-bounded local cache, named by their SHA-256 and checked against
it, so a warm cache serves a second run (or a second worker on the host) without the network."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from ddl_apps.cache import cache_dir
from ddl_apps.core.redact import redact_text
from ddl_apps.errors import DataError

STORAGE_FIX = ("check data.prepared (the folder or s3:// URL), that the bucket exists and is reachable (for an "
               "S3-compatible server, AWS_ENDPOINT_URL), and the credentials in the environment or ~/.aws")


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


class Store:
    """Reads the files of one prepared dataset. Every failure of the storage becomes one DataError that names the
    file and the fix, never the credentials."""

    def __init__(self, location: str, cache_bytes: int = 0):
        import fsspec

        self.location = location.rstrip("/")
        self.remote = is_remote(location)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.location)
        except (ImportError, ValueError) as e:
            raise DataError(f"cannot open {self.location}: {e}; {STORAGE_FIX}") from None
        self.cache = ChunkCache(cache_dir("shard-cache"), cache_bytes) if self.remote and cache_bytes else None
        self.bytes_read = 0  # from storage, by read_range (not from the cache)

    def url(self, name: str) -> str:
        return f"{self.location}/{name}"

    def read(self, name: str) -> bytes:
        """A whole (small) file."""
        return self.attempt(name, lambda path: self.fs.cat_file(path))

    def sizes(self) -> dict[str, int]:
        """The size of each file of the dataset, by name (one listing)."""
        listing = self.attempt("", lambda path: self.fs.ls(self.root, detail=True))
        return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry["size"]) for entry in listing
                if entry.get("type") == "file"}

    def read_range(self, name: str, start: int, end: int, sha256: str) -> bytes:
        """Bytes [start, end) of a file. From object storage they are checked against their SHA-256; a local file
        is checked whole before training instead (PreparedDataset.verify), so its chunks are not hashed again
        at every read."""
        cached = self.cache.get(sha256) if self.cache else None
        if cached is not None:
            return cached
        data = self.attempt(name, lambda path: self._range(path, start, end))
        self.bytes_read += len(data)
        if len(data) != end - start or (self.remote and hashlib.sha256(data).hexdigest() != sha256):
            raise DataError(f"{self.url(name)} is truncated or altered: bytes {start}-{end} do not match the SHA-256 "
                            "its manifest gives. Prepare the dataset again (ddl data prepare), or copy the shard again")
        if self.cache:
            self.cache.put(sha256, data)
        return data

    def _range(self, path: str, start: int, end: int) -> bytes:
        if not self.remote:  # one pread, no per-call file-system machinery
            with open(path, "rb") as f:
                return os.pread(f.fileno(), end - start, start)
        return self.fs.cat_file(path, start=start, end=end)

    def attempt(self, name: str, action):
        """`action(path of name)`, with the storage's errors as one DataError."""
        path = f"{self.root}/{name}"
        try:
            return action(path)
        except FileNotFoundError:
            raise DataError(f"{self.url(name)} is missing: the prepared dataset is incomplete or is not at "
                            f"{self.location}. Prepare it again (ddl data prepare), or {STORAGE_FIX}") from None
        except PermissionError as e:
            raise DataError(f"access to {self.url(name)} was denied ({redact_text(str(e))}); {STORAGE_FIX}") from None
        except OSError as e:
            raise DataError(f"cannot reach {self.url(name)}: {redact_text(str(e))}; {STORAGE_FIX}") from None
        except Exception as e:  # botocore and aiohttp raise their own kinds for unreachable endpoints
            raise DataError(f"cannot reach {self.url(name)} ({type(e).__name__}: {redact_text(str(e))}); "
                            f"{STORAGE_FIX}") from None


class ChunkCache:
    """Files named by their content's SHA-256 under `folder`, at most `limit` bytes in all: the least recently used
    go first. Writers on one host may race; each file appears whole (written aside, then renamed)."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())

    def get(self, sha256: str) -> bytes | None:
        path = self.folder / sha256
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:  # a damaged cache entry is read again from storage
            path.unlink(missing_ok=True)
            return None
        os.utime(path)
        return data

    def put(self, sha256: str, data: bytes) -> None:
        if len(data) > self.limit:
            return
        with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".", delete=False) as f:
            f.write(data)
        os.replace(f.name, self.folder / sha256)
        self.size += len(data)
        if self.size > self.limit:
            self._evict()

    def _evict(self) -> None:
        entries = sorted((p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime)
        self.size = sum(p.stat().st_size for p in entries)
        for path in entries:
            if self.size <= self.limit * 0.9:
                break
            self.size -= path.stat().st_size
            path.unlink(missing_ok=True)
