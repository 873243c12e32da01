"""Where a prepared dataset lives: a local folder or an fsspec URL (`s3://bucket/prefix`), read by byte range.
Pieces read from remote storage are kept in a size-bounded local cache, named by their SHA-256 and checked against
it, so a warm cache serves a second run (or a second worker on the host) without the network."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import resource
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

from ddl_apps.cache import cache_dir
from ddl_apps.core.redact import redact_text
from ddl_apps.data.progress import message
from ddl_apps.errors import DataError

STORAGE_FIX = ("check data.prepared (the folder or s3:// URL), that the bucket exists and is reachable (for an "
               "S3-compatible server, AWS_ENDPOINT_URL), and the credentials in the environment or ~/.aws")


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


class Store:
    """Reads the files of one prepared dataset. Every failure of the storage becomes one DataError that names the
    file and the fix, never the credentials.

    A local dataset is read through files held open: its folder from the start, each file from its first use
    (`hold`), so a dataset prepared again into the same folder, or set aside, while a job reads it does not change
    what the job reads (the old files live on until the job lets them go)."""

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
        self._held: dict[str, int] = {}  # local: open files by name, the folder under ""
        if not self.remote:
            allow_open_files_up_to_the_hard_limit()  # (a shard is 256 MiB: 1,024 of them hold 256 GiB)
            self._held[""] = self.attempt("", lambda path: os.open(path, os.O_RDONLY | os.O_DIRECTORY))
            weakref.finalize(self, _close_all, self._held)

    def url(self, name: str) -> str:
        return f"{self.location}/{name}"

    def hold(self, name: str) -> int:
        """A local file of the dataset, opened once (FileNotFoundError if it is not there)."""
        if name not in self._held:
            self._held[name] = os.open(name, os.O_RDONLY, dir_fd=self._held[""])
        return self._held[name]

    def read(self, name: str) -> bytes:
        """A whole (small) file."""
        if self.remote:
            return self.attempt(name, lambda path: self.fs.cat_file(path))
        return self.attempt(name, lambda _: self._whole(self.hold(name)))

    @staticmethod
    def _whole(fd: int) -> bytes:
        return os.pread(fd, os.fstat(fd).st_size, 0)

    def sizes(self, names: Iterable[str]) -> dict[str, int]:
        """The size of each of these files that exists, by name (one listing in object storage)."""
        if not self.remote:
            return {name: os.fstat(fd).st_size for name, fd in self.hold_existing(names).items()}
        listing = self.attempt("", lambda path: self.fs.ls(self.root, detail=True))
        found = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry["size"]) for entry in listing
                 if entry.get("type") == "file"}
        return {name: found[name] for name in names if name in found}

    def hold_existing(self, names: Iterable[str]) -> dict[str, int]:
        """Of these local files, those that exist, held open (the others are missing)."""
        held = {}
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                held[name] = self.hold(name)
        return held

    def read_range(self, name: str, start: int, end: int, sha256: str) -> bytes:
        """Bytes [start, end) of a file. From object storage they are checked against their SHA-256; a local file
        is checked whole before training instead (PreparedDataset.verify), so its chunks are not hashed again
        at every read."""
        cached = self.cache.get(sha256) if self.cache else None
        if cached is not None:
            return cached
        data = self.attempt(name, lambda path: self._range(name, path, start, end))
        self.bytes_read += len(data)
        if len(data) != end - start or (self.remote and hashlib.sha256(data).hexdigest() != sha256):
            raise DataError(f"{self.url(name)} is truncated or altered: bytes {start}-{end} do not match the SHA-256 "
                            "its manifest gives. Prepare the dataset again (ddl data prepare), or copy the shard again")
        if self.cache:
            self.cache.put(sha256, data)
        return data

    def _range(self, name: str, path: str, start: int, end: int) -> bytes:
        if not self.remote:  # one pread, no per-call file-system machinery
            return os.pread(self.hold(name), end - start, start)
        return self.fs.cat_file(path, start=start, end=end)

    def download(self, name: str, destination: Path) -> None:
        """A file from object storage to a local path, streamed (not held in memory)."""
        self.attempt(name, lambda path: self.fs.get_file(path, str(destination)))

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


def allow_open_files_up_to_the_hard_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):  # (an unlimited hard limit is more than the kernel allows)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _close_all(held: dict[str, int]) -> None:
    for fd in held.values():
        os.close(fd)


class ChunkCache:
    """Files named by their content's SHA-256 under `folder`, shared by the processes of a host and bounded
    together: at most `limit` bytes in all, the least recently used out first.

    The running total is kept in a file beside them, changed under a lock; each eviction counts the folder again,
    so a total that drifted (a writer killed between its file and the total) is put right. Each file appears whole
    (written aside, then renamed); what a killed writer left aside is removed after STALE_SECONDS. A chunk the cache
    cannot keep (a full disk) is served all the same, with one warning."""

    TOTAL, LOCK, PART = ".total", ".lock", ".part-"
    STALE_SECONDS = 600

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self._warned = False

    def get(self, sha256: str) -> bytes | None:
        path = self.folder / sha256
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # never kept, or evicted by another process
            return None
        if hashlib.sha256(data).hexdigest() != sha256:  # a damaged cache entry is read again from storage
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # recently used
        return data

    def put(self, sha256: str, data: bytes) -> None:
        if len(data) > self.limit:
            return
        try:
            self._write(self.folder / sha256, data)
            with self._locked():
                total = self._total()
                total = self._evict() if total is None or total + len(data) > self.limit else total + len(data)
                (self.folder / self.TOTAL).write_text(str(total))
        except OSError as e:
            if not self._warned:
                self._warned = True
                message(f"warning: the chunk cache {self.folder} cannot keep chunks ({e.strerror or e}): they are "
                        "read from storage each time. Free space there, or set DDL_CACHE to another disk")

    def _write(self, path: Path, data: bytes) -> None:
        fd, part = tempfile.mkstemp(dir=self.folder, prefix=self.PART)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(part, path)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / self.LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
            yield

    def _total(self) -> int | None:
        try:
            return int((self.folder / self.TOTAL).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _evict(self) -> int:
        """Count the folder, remove the least recently used files down to 90 % of the limit and what killed writers
        left; the bytes that remain."""
        entries, stale = [], time.time() - self.STALE_SECONDS
        for entry in os.scandir(self.folder):
            try:
                stat = entry.stat()
            except FileNotFoundError:  # removed meanwhile (a damaged entry a reader dropped)
                continue
            if entry.name.startswith(self.PART) and stat.st_mtime < stale:
                Path(entry.path).unlink(missing_ok=True)
            elif not entry.name.startswith("."):
                entries.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.limit * 0.9:
                break
            Path(path).unlink(missing_ok=True)
            total -= size
        return total
