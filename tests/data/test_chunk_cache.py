"""Issue 33, item 6: the local cache of chunks read from object storage, shared by the workers of a host. Object
storage is fsspec's in-memory file system here (each process has its own copy of the same bytes); the cache is
the real one, on disk."""

import contextlib
import hashlib
import multiprocessing
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from ddl_apps.data.store import ChunkCache, Store

CHUNK = 4096


def chunks(count: int) -> list[bytes]:
    """The same `count` chunks of random bytes in every process."""
    rng = np.random.default_rng(0)
    return [rng.bytes(CHUNK) for _ in range(count)]


def bucket(name: str, data: list[bytes]) -> Store:
    """A Store over one file of `data` in object storage (fsspec's memory file system)."""
    store = Store(f"memory://{name}", cache_bytes=16 * CHUNK)
    store.fs.pipe_file(f"{store.root}/shard.arrow", b"".join(data))
    return store


def read_all(store: Store, data: list[bytes], order: np.ndarray) -> None:
    for i in order:
        got = store.read_range("shard.arrow", i * CHUNK, (i + 1) * CHUNK, hashlib.sha256(data[i]).hexdigest())
        assert got == data[i]


def worker(cache: str, seed: int) -> None:
    """One worker of the host: reads the 64 chunks in its own order, three times, through a 16-chunk cache."""
    os.environ["DDL_CACHE"] = cache
    data = chunks(64)
    read_all(bucket(f"w{seed}", data), data, np.random.default_rng(seed).integers(64, size=192))


def cached_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if not p.name.startswith("."))


def test_workers_of_a_host_share_one_bounded_cache(tmp_path):
    """Four workers evicting from one folder with a limit of 16 chunks: 3 of 4 crashed (FileNotFoundError from
    the `stat` of a file another had evicted), and each counted only its own writes, so the host held N times the
    limit. All four finish now, and the folder holds at most the limit."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=worker, args=(str(tmp_path), seed)) for seed in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
    assert [process.exitcode for process in workers] == [0, 0, 0, 0]
    assert 0 < cached_bytes(tmp_path / "shard-cache") <= 16 * CHUNK


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 16 KiB file system (tmpfs, mounted as root, as the multi-host tests' namespaces are made),
    filled."""
    folder = tmp_path / "full"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)], check=True)
    try:
        with contextlib.suppress(OSError), (folder / "filler").open("wb") as f:
            f.write(b"x" * 65536)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_chunk_the_cache_cannot_keep_is_served_all_the_same(full_disk, monkeypatch, capfd):
    """A full disk under the cache failed reads that had succeeded (the write's ENOSPC was raised to the worker)."""
    monkeypatch.setenv("DDL_CACHE", str(full_disk))
    data = chunks(4)
    read_all(bucket("full", data), data, np.arange(4))
    assert capfd.readouterr().err.count("cannot keep chunks (No space left on device)") == 1
    assert cached_bytes(full_disk / "shard-cache") == 0


def test_what_killed_writers_left_is_removed(tmp_path):
    """A worker killed between writing a chunk aside and renaming it left the file for good."""
    cache = ChunkCache(tmp_path, 2 * CHUNK)
    left, fresh = tmp_path / f"{ChunkCache.PART}killed", tmp_path / f"{ChunkCache.PART}writing"
    left.write_bytes(b"x" * CHUNK)
    fresh.write_bytes(b"x" * CHUNK)
    hour_ago = time.time() - 3600
    os.utime(left, (hour_ago, hour_ago))
    for data in chunks(3):  # the third is over the limit: the cache is counted and evicted
        cache.put(hashlib.sha256(data).hexdigest(), data)
    assert not left.exists() and fresh.exists()
    assert cached_bytes(tmp_path) <= 2 * CHUNK
