"""Reading a prepared dataset: its splits chunk by chunk, as a stream for training (each worker reads only the chunks
of its own examples, ahead of the step, in a background thread) and by index for evaluation."""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ddl_apps.cache import build_once, cache_dir, file_sha256, stream_sha256
from ddl_apps.core import sharding
from ddl_apps.data.manifest import MANIFEST, Chunk, File, Manifest, Shard
from ddl_apps.data.shards import Columns, decode_chunk, schema_of
from ddl_apps.data.store import Store
from ddl_apps.errors import DataError

Convert = Callable[[Columns], dict[str, Any]]
Augment = Callable[[Columns, np.ndarray, int], Columns]  # (columns, their global row ids, epoch) -> columns
Order = Literal["chunks", "full"]


class PreparedDataset:
    """A prepared dataset at a local folder or URL: its manifest (parsed, not yet checked) and its splits."""

    def __init__(self, location: str, cache_bytes: int = 0):
        self.store = Store(location, cache_bytes)
        self.where = self.store.url(MANIFEST)
        self.manifest = Manifest.parse(self.store.read(MANIFEST), self.where)
        if not self.store.remote:  # at once: the files of this manifest, before they can be replaced
            self.store.hold_existing(self.stored())

    def split(self, name: str) -> SplitReader:
        return SplitReader(self, name)

    def stored(self) -> dict[str, File | Shard]:
        """Every file of the dataset but the manifest, by name: shards and the files beside them."""
        shards = {shard.file: shard for shards in self.manifest.splits.values() for shard in shards}
        return {**shards, **self.manifest.files}

    def file(self, name: str) -> Path:
        """A file beside the shards, as a local path, checked against its SHA-256: the file this dataset holds open
        (Linux's /proc/self/fd, so it stays the file verified), or from object storage a copy downloaded once into
        the cache."""
        entry = self.manifest.files[name]
        if not self.store.remote:
            return Path(f"/proc/self/fd/{verify_local_file(self.store, name, entry.sha256)}")
        path = cache_dir("prepared-files") / entry.sha256
        if not path.exists() or file_sha256(path) != entry.sha256:
            partial = path.with_name(f".{path.name}.{os.getpid()}")
            self.store.download(name, partial)
            if file_sha256(partial) != entry.sha256:
                partial.unlink()
                raise altered(self.store.url(name))
            partial.replace(path)
        return path

    def verify(self) -> None:
        """Before training: every shard is there and of its size (a listing); local shards are also read through
        against their SHA-256, once per host for each version of a file (a stamp in the cache remembers it).
        Chunks read from object storage are checked as they arrive."""
        stored = self.stored()
        sizes = self.store.sizes(stored)
        for name, entry in stored.items():
            if name not in sizes:
                raise missing(self.store.url(name))
            if sizes[name] != entry.bytes:
                raise DataError(f"{self.store.url(name)} has {sizes[name]:,} bytes, and its manifest says "
                                f"{entry.bytes:,}: it is truncated or altered. Prepare the dataset again (ddl data "
                                "prepare), or copy the file again")
            if not self.store.remote:
                verify_local_file(self.store, name, entry.sha256)


def missing(where: str) -> DataError:
    return DataError(f"{where} is missing; prepare the dataset again (ddl data prepare), or copy the missing file back")


def altered(where: str) -> DataError:
    return DataError(f"{where} does not match the SHA-256 its manifest gives: it was altered or damaged. Prepare the "
                     "dataset again (ddl data prepare), or copy the file again")


def _stamp(path: Path, stat: os.stat_result, sha256: str) -> Path:
    """The cache's mark that this version of the file (its inode, size and time) was found to match `sha256`."""
    version = f"{path.resolve()}|{stat.st_dev}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{sha256}"
    return cache_dir("verified") / hashlib.sha256(version.encode()).hexdigest()[:32]


def verify_local_file(store: Store, name: str, sha256: str) -> int:
    """Hash the file (held open) whole, once per host for each version of it: the workers of a host take turns on
    the stamp (cache.build_once), so the first hashes it and the others find it stamped. A file that is gone before
    it is opened (a damaged dataset another worker set aside) is missing, as a DataError. Returns the open file."""
    where = store.url(name)

    def check() -> None:
        with os.fdopen(os.dup(fd), "rb") as f:
            if stream_sha256(f) != sha256:
                raise altered(where)
        stamp.touch()

    try:
        fd = store.hold(name)
    except FileNotFoundError:
        raise missing(where) from None
    stamp = _stamp(Path(store.root) / name, os.fstat(fd), sha256)
    build_once(stamp, check)
    return fd


def stamp_verified(folder: Path, stored: dict[str, File | Shard]) -> None:
    """Remember files just written (and hashed) as checked."""
    for name, entry in stored.items():
        _stamp(folder / name, (folder / name).stat(), entry.sha256).touch()


class SplitReader:
    """One split's chunks, numbered in the manifest's order; global row ids run through them in that order."""

    def __init__(self, dataset: PreparedDataset, name: str):
        self.dataset = dataset
        self.columns = dataset.manifest.columns[name]
        self.schema = schema_of(self.columns)
        self.chunks: list[tuple[str, Chunk]] = [(shard.file, chunk) for shard in dataset.manifest.splits[name]
                                                for chunk in shard.chunks]
        self.chunk_rows = np.array([chunk.rows for _, chunk in self.chunks], dtype=np.int64)
        self.first_row = np.concatenate([[0], np.cumsum(self.chunk_rows)])
        self.rows = int(self.first_row[-1])

    def read_chunk(self, index: int, columns: Sequence[str] | None = None) -> Columns:
        """One chunk's columns (all, or those named)."""
        file, chunk = self.chunks[index]
        data = self.dataset.store.read_range(file, chunk.offset, chunk.offset + chunk.length, chunk.sha256)
        if columns is None:
            return decode_chunk(data, self.schema, self.columns)
        wanted = decode_chunk(data, self.schema, {name: self.columns[name] for name in columns})
        return {name: values.copy() for name, values in wanted.items()}  # (a view would hold the whole chunk)

    def batches(self, columns: Sequence[str] | None = None, max_rows: int | None = None,
                threads: int = 8) -> Iterator[Columns]:
        """The split chunk by chunk (about 1 MiB each), in order, `threads` read ahead: all of it, or its first
        chunks up to about `max_rows` rows; their columns (all, or those named)."""
        count = len(self.chunks) if max_rows is None else int(np.searchsorted(self.first_row[:-1], max_rows))
        with ThreadPoolExecutor(threads) as pool:
            reading: deque[Future[Columns]] = deque()
            for index in range(count):
                reading.append(pool.submit(self.read_chunk, index, columns))
                if len(reading) == threads:
                    yield reading.popleft().result()
            while reading:
                yield reading.popleft().result()

    def load(self, max_rows: int | None = None, columns: Sequence[str] | None = None) -> Columns:
        """The split in memory (what batches() gives, whole)."""
        chunks = list(self.batches(columns, max_rows))
        return {name: np.concatenate([c[name] for c in chunks]) for name in columns or self.columns}

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(chunk, row within it) of global row ids."""
        chunk = np.searchsorted(self.first_row, rows, side="right") - 1
        return chunk, rows - self.first_row[chunk]


class ChunkSupply:
    """Decoded chunks of one split, read on a small thread pool ahead of need; at most `keep` held (the least
    recently used go), or all of them, read once, with `in_memory`."""

    def __init__(self, reader: SplitReader, keep: int = 64, threads: int = 4, in_memory: bool = False):
        self.reader, self.keep, self.in_memory = reader, keep, in_memory
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="ddl-chunks")
        self._chunks: OrderedDict[int, Future[Columns]] = OrderedDict()
        self._lock = threading.Lock()
        if in_memory:
            self.fetch(range(len(reader.chunks)))

    def fetch(self, chunks: Any) -> dict[int, Future[Columns]]:
        """These chunks, read or on their way (reading starts for those that are neither); the least recently used
        others are let go beyond `keep`, never these."""
        with self._lock:
            futures = {}
            for index in map(int, chunks):
                future = self._chunks.pop(index, None) or self._pool.submit(self.reader.read_chunk, index)
                self._chunks[index] = futures[index] = future  # (re)inserted last: the most recently used
            while not self.in_memory and len(self._chunks) > max(self.keep, len(futures)):
                self._chunks.popitem(last=False)
            return futures

    def gather(self, rows: np.ndarray) -> Columns:
        """The given global rows, in the given order."""
        chunk, within = self.reader.locate(rows)
        futures = self.fetch(np.unique(chunk))
        out: Columns = {}
        for c, future in futures.items():
            values, picked = future.result(), np.flatnonzero(chunk == c)
            for name, column in values.items():
                if name not in out:
                    out[name] = np.empty((len(rows), *column.shape[1:]), dtype=column.dtype)
                out[name][picked] = column[within[picked]]
        return out


class IndexedSplit:
    """A split read by index (a BatchSource): for evaluation, whose shards are contiguous ranges of rows, so each
    worker reads about 1/N of the chunks."""

    def __init__(self, reader: SplitReader, convert: Convert, in_memory: bool = False):
        self.supply, self.convert = ChunkSupply(reader, in_memory=in_memory), convert

    def __len__(self) -> int:
        return self.supply.reader.rows

    def take(self, indices: np.ndarray) -> dict[str, Any]:
        return self.convert(self.supply.gather(np.asarray(indices, dtype=np.int64)))


class LaneOrder:
    """An epoch's order of a chunked split that does not depend on the number of workers and lets each worker read
    only its own chunks.

    The chunks are shuffled into one stream of rows (each chunk's rows in an order of their own), and the stream
    is cut into `lanes` equal lanes. Global step s takes global_batch/lanes rows from each lane, lane after lane;
    core/sharding.py hands each worker a contiguous share of the step, so with N workers dividing `lanes` a worker
    reads its lanes' chunks only (a chunk at a lane's end is shared with the next lane). Example order within a
    chunk changes every epoch; which examples share a chunk does not (prepare shuffled the split once).

    With `lengths` (row ids -> lengths, read from the rows' chunks), steps hold rows of similar length, as
    core/sharding.py's bucketed_order does for data read by index: each lane sorts `window` steps' worth of its
    rows by length and cuts them into one group per step, and the steps of the window take the groups in an order
    drawn once for all lanes, so the lanes of a step give groups of about the same length."""

    def __init__(self, chunk_rows: np.ndarray, seed: int, epoch: int, lanes: int, global_batch: int,
                 lengths: Callable[[np.ndarray], np.ndarray] | None = None, window: int = 50):
        self.seed, self.epoch, self.chunk_rows = seed, epoch, chunk_rows
        self.lanes = math.gcd(lanes, global_batch)
        self.per_lane = global_batch // self.lanes
        self.chunk_order = np.random.default_rng([seed, epoch, 2]).permutation(len(chunk_rows))
        self.stream_start = np.concatenate([[0], np.cumsum(chunk_rows[self.chunk_order])])
        self.chunk_first = np.concatenate([[0], np.cumsum(chunk_rows)])
        self.lane_length = int(self.stream_start[-1]) // self.lanes
        self.steps = self.lane_length // self.per_lane
        self.lengths, self.window = lengths, window
        self._within: OrderedDict[int, np.ndarray] = OrderedDict()
        self._groups: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def step_rows(self, step: int) -> np.ndarray:
        """The global row ids of global step `step`, lane after lane."""
        return self.rows_at(step, np.arange(self.lanes * self.per_lane))

    def rows_at(self, step: int, positions: np.ndarray) -> np.ndarray:
        """The row ids at `positions` (0 .. global_batch - 1) of step `step`; only those positions' lanes are read."""
        lane, offset = np.divmod(positions, self.per_lane)
        if self.lengths is None:
            return self._stream_rows(lane * self.lane_length + step * self.per_lane + offset)
        window, within = divmod(step, self.window)
        group = self._window_order(window)[within]
        rows = np.empty(len(positions), dtype=np.int64)
        for one in np.unique(lane):
            picked = lane == one
            rows[picked] = self._window_groups(int(one), window)[group, offset[picked]]
        return rows

    def _stream_rows(self, positions: np.ndarray) -> np.ndarray:
        """Global row ids at stream positions."""
        k = np.searchsorted(self.stream_start, positions, side="right") - 1
        offsets = positions - self.stream_start[k]
        chunks = self.chunk_order[k]
        within = np.empty_like(offsets)
        for c in np.unique(chunks):
            picked = chunks == c
            within[picked] = self._order_within(int(c))[offsets[picked]]
        return self.chunk_first[chunks] + within

    def _order_within(self, chunk: int) -> np.ndarray:
        if chunk not in self._within:
            rng = np.random.default_rng([self.seed, self.epoch, 3, chunk])
            self._within[chunk] = rng.permutation(int(self.chunk_rows[chunk]))
            if len(self._within) > 4 * self.lanes:
                self._within.popitem(last=False)
        return self._within[chunk]

    def _window_steps(self, window: int) -> int:
        return min(self.window, self.steps - window * self.window)

    def _window_order(self, window: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch, 4, window]).permutation(self._window_steps(window))

    def _window_groups(self, lane: int, window: int) -> np.ndarray:
        """[steps of the window, per_lane] row ids of a lane's window, shortest group first."""
        if (lane, window) not in self._groups:
            assert self.lengths is not None
            start = lane * self.lane_length + window * self.window * self.per_lane
            rows = self._stream_rows(start + np.arange(self._window_steps(window) * self.per_lane))
            ordered = rows[np.argsort(self.lengths(rows), kind="stable")]
            self._groups[(lane, window)] = ordered.reshape(-1, self.per_lane)
            if len(self._groups) > 2 * self.lanes:
                self._groups.popitem(last=False)
        return self._groups[(lane, window)]


class FullOrder:
    """A full random permutation of the split each epoch (core/sharding.py's, as for data read by index): every
    step draws from every chunk, so each worker reads every chunk."""

    def __init__(self, rows: int, seed: int, epoch: int, global_batch: int):
        self.order, self.global_batch = sharding.epoch_order(rows, seed, epoch), global_batch

    def rows_at(self, step: int, positions: np.ndarray) -> np.ndarray:
        return self.order[step * self.global_batch + positions]


class StreamedSplit:
    """A training split as a StreamSource: each worker gets its share of each global step, read from the chunks
    that hold it: batches are built `ahead` steps in advance on a background thread, and the chunks a step needs
    are asked for `read_ahead` steps before it (so reading, from disk or object storage, overlaps training).
    `augment`, if given, draws per-example randomness (negatives, augmentation) from the rows' ids and the epoch
    alone, never from a global generator (the thread would race the training step for it), so the draws do not
    depend on the number of workers and a resumed run draws the same."""

    def __init__(self, reader: SplitReader, seed: int, convert: Convert, order: Order = "chunks", lanes: int = 16,
                 in_memory: bool = False, ahead: int = 4, read_ahead: int = 16, bucket_by: str | None = None,
                 augment: Augment | None = None):
        self.reader, self.seed, self.convert, self.order, self.lanes = reader, seed, convert, order, lanes
        self.examples = reader.rows
        self.ahead, self.read_ahead, self.bucket_by, self.augment = ahead, read_ahead, bucket_by, augment
        self.supply = ChunkSupply(reader, keep=max(64, 4 * lanes), in_memory=in_memory)

    def epoch_order(self, epoch: int, global_batch: int) -> LaneOrder | FullOrder:
        if self.order == "full":
            return FullOrder(self.examples, self.seed, epoch, global_batch)
        lengths = None if self.bucket_by is None else self._lengths
        return LaneOrder(self.reader.chunk_rows, self.seed, epoch, self.lanes, global_batch, lengths)

    def _columns(self, rows: np.ndarray, epoch: int) -> Columns:
        columns = self.supply.gather(rows)
        return columns if self.augment is None else self.augment(columns, rows, epoch)

    def _lengths(self, rows: np.ndarray) -> np.ndarray:
        assert self.bucket_by is not None
        return self.supply.gather(rows)[self.bucket_by]

    def rank_steps(self, epoch: int, first: int, global_batch: int, rank: int, size: int,
                   micro_batches: int) -> Iterator[list[dict[str, Any]]]:
        order = self.epoch_order(epoch, global_batch)
        steps = sharding.steps_per_epoch(self.examples, global_batch)

        positions = sharding.rank_step_batches(np.arange(global_batch), 0, global_batch, rank, size, micro_batches)

        def share(step: int) -> list[np.ndarray]:
            return [order.rows_at(step, p) for p in positions]

        def produce(step: int) -> list[dict[str, Any]]:
            if step + self.read_ahead < steps:  # start reading what a later step needs
                self.supply.fetch(np.unique(self.reader.locate(np.concatenate(share(step + self.read_ahead)))[0]))
            return [self.convert(self._columns(rows, epoch)) for rows in share(step)]

        return _in_background(map(produce, range(first, steps)), self.ahead)


def _in_background(items: Iterator[Any], ahead: int) -> Iterator[Any]:
    """`items`, produced up to `ahead` in advance on a daemon thread; its errors are raised here. The thread stops
    when the consumer drops the iterator."""
    buffer: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(("item", item), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(("end", None))
        except BaseException as e:  # handed to the consumer
            buffer.put(("error", e))

    threading.Thread(target=run, daemon=True, name="ddl-stream").start()
    return _consume(buffer, stop)


def _consume(buffer: queue.Queue[tuple[str, Any]], stop: threading.Event) -> Iterator[Any]:
    try:
        while True:
            kind, item = buffer.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()


def task_splits(dataset: PreparedDataset, cfg: Any, seed: int, convert: Convert, bucket_by: str | None = None,
                augment: Augment | None = None, train_convert: Convert | None = None) -> tuple[Any, ...]:
    """(train, valid, test) of a prepared dataset for a task, read as `cfg` (a PreparedData section) says: the
    training split streamed (its steps bucketed by the column `bucket_by`, `augment`ed, and converted by
    `train_convert` instead of `convert`, if given), the others read by index; with `stream: false` all of them
    loaded into memory."""
    in_memory = not cfg.stream
    train = StreamedSplit(dataset.split("train"), seed, train_convert or convert, cfg.shuffle, cfg.lanes,
                          in_memory=in_memory, bucket_by=bucket_by, augment=augment)
    valid, test = (IndexedSplit(dataset.split(name), convert, in_memory=in_memory) if name in dataset.manifest.splits
                   else None for name in ("valid", "test"))
    return train, valid, test
