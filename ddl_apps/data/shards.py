"""Shards: Arrow IPC files (readable by any Arrow tool) of record batches, the chunks, each read on its own by byte
range. Columns hold one value or one fixed-shape array per example (a FixedSizeList, flattened row-major), a text
(dtype "str", numpy object arrays of str) or bytes (dtype "bytes", numpy object arrays of bytes: an encoded file)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from ddl_apps.data.manifest import Chunk, Column, Shard

Columns = dict[str, np.ndarray]
TEXT, BYTES = "str", "bytes"  # the dtypes of text and of bytes columns (numpy object arrays)
ARROW_OBJECTS = {TEXT: pa.string(), BYTES: pa.binary()}


def dtype_of(values: np.ndarray) -> str:
    if values.dtype != object:
        return str(values.dtype)
    return BYTES if len(values) and isinstance(values[0], bytes) else TEXT


def columns_of(batch: Columns) -> dict[str, Column]:
    return {name: Column(dtype=dtype_of(values), shape=list(values.shape[1:])) for name, values in batch.items()}


def row_bytes(batch: Columns) -> float:
    """What one row of `batch` weighs, on average (texts and bytes by their length)."""
    rows = max(1, len(next(iter(batch.values()))))
    return sum(sum(map(len, values)) if values.dtype == object else values.nbytes for values in batch.values()) / rows


def schema_of(columns: dict[str, Column]) -> pa.Schema:
    def arrow_type(column: Column) -> pa.DataType:
        if column.shape and math.prod(column.shape) == 0:
            return pa.null()  # Arrow has no lists of fixed size 0: an empty row is a null
        scalar = ARROW_OBJECTS.get(column.dtype) or pa.from_numpy_dtype(np.dtype(column.dtype))
        return pa.list_(scalar, math.prod(column.shape)) if column.shape else scalar
    return pa.schema([(name, arrow_type(column)) for name, column in columns.items()])


def to_record_batch(batch: Columns, schema: pa.Schema) -> pa.RecordBatch:
    arrays = []
    for field in schema:
        values = batch[field.name]
        if field.type == pa.null():
            arrays.append(pa.nulls(len(values)))
        elif values.ndim == 1:
            arrays.append(pa.array(values, type=field.type))
        else:
            flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=field.type.value_type)
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, field.type.list_size))
    return pa.record_batch(arrays, schema=schema)


def decode_chunk(data: bytes, schema: pa.Schema, columns: dict[str, Column]) -> Columns:
    """A chunk's bytes (one IPC message) as numpy columns, without copying where Arrow allows."""
    batch = pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(data)), schema)
    return {name: to_numpy(batch.column(name), column) for name, column in columns.items()}


def to_numpy(array: pa.Array, column: Column) -> np.ndarray:
    if array.type == pa.null():
        return np.zeros((len(array), *column.shape), dtype=column.dtype)
    if column.shape:
        return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), *column.shape)
    return array.to_numpy(zero_copy_only=False)


class ShardFile:
    """One shard being written, a chunk (one record batch) at a time, so memory holds a chunk, not the shard; closed,
    it is read back a chunk at a time for each chunk's byte range and SHA-256."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = path, schema
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, schema)
        self.ranges: list[tuple[int, int, int]] = []  # (start, end, rows) of each chunk

    @property
    def rows(self) -> int:
        return sum(rows for _, _, rows in self.ranges)

    def write_chunk(self, chunk: Columns) -> None:
        if not self.ranges:  # an empty batch first, so that every chunk's range holds its own message alone
            self._writer.write_batch(to_record_batch({k: v[:0] for k, v in chunk.items()}, self.schema))
        before = self._sink.tell()
        self._writer.write_batch(to_record_batch(chunk, self.schema))
        self.ranges.append((before, self._sink.tell(), len(next(iter(chunk.values())))))

    def close(self) -> Shard:
        self._writer.close()
        self._sink.close()
        whole, chunks = hashlib.sha256(), []
        with self.path.open("rb") as written:
            whole.update(written.read(self.ranges[0][0]))
            for start, end, rows in self.ranges:
                data = written.read(end - start)
                whole.update(data)
                chunks.append(Chunk(offset=start, length=end - start, rows=rows,
                                    sha256=hashlib.sha256(data).hexdigest()))
            whole.update(written.read())
        return Shard(file=self.path.name, bytes=self.path.stat().st_size, sha256=whole.hexdigest(), rows=self.rows,
                     chunks=chunks)


class SplitWriter:
    """One split's rows, added batch by batch in bounded memory, written as shards of `shard_rows` rows, a chunk
    at a time (memory holds less than a chunk of rows not yet written).

    With `shuffle_seed`, the rows are shuffled across the whole split once, here: each row goes to one of
    ceil(expected_rows / shard_rows) buckets at random (temporary files), and each bucket becomes a shard in an
    order drawn at random. Training then reads chunks in a new order each epoch, and any chunk is a random sample
    of the split (the split may come sorted, by time say)."""

    def __init__(self, folder: Path, split: str, columns: dict[str, Column], chunk_rows: int, shard_rows: int,
                 expected_rows: int = 0, shuffle_seed: int | None = None):
        self.folder, self.split, self.columns = folder, split, columns
        self.schema = schema_of(columns)
        self.chunk_rows, self.shard_rows = chunk_rows, max(chunk_rows, shard_rows)
        self.shards: list[Shard] = []
        self._pending: list[Columns] = []  # rows not yet written: less than a chunk
        self._shard: ShardFile | None = None
        self._rng = None if shuffle_seed is None else np.random.default_rng([shuffle_seed, 7])
        self._buckets: list[tuple[pa.NativeFile, pa.ipc.RecordBatchStreamWriter]] = []  # (file, its writer)
        if self._rng is not None:
            count = max(1, math.ceil(expected_rows / self.shard_rows))
            files = [pa.OSFile(str(self._bucket_path(i)), "wb") for i in range(count)]
            self._buckets = [(file, pa.ipc.new_stream(file, self.schema)) for file in files]

    def _bucket_path(self, i: int) -> Path:
        return self.folder / f".{self.split}-bucket-{i:05d}.arrows"

    def add(self, batch: Columns) -> None:
        if self._rng is None:
            self._write_rows(batch)
            return
        bucket = self._rng.integers(len(self._buckets), size=len(next(iter(batch.values()))))
        for i, (_, writer) in enumerate(self._buckets):
            picked = np.flatnonzero(bucket == i)
            if len(picked):
                writer.write_batch(to_record_batch({k: v[picked] for k, v in batch.items()}, self.schema))

    def finish(self) -> list[Shard]:
        if self._rng is None:
            self._write_rows(None)
            return self.shards
        # The files closed here: a writer opened from a path kept its file open as long as the writer lived, and the
        # buckets unlinked below kept their disk space to the end (the training split's size, twice).
        for file, writer in self._buckets:
            writer.close()
            file.close()
        for i in self._rng.permutation(len(self._buckets)):
            with pa.memory_map(str(self._bucket_path(i))) as mapped:  # read in place: page cache, not memory
                table = pa.ipc.open_stream(mapped).read_all()
                order = self._rng.permutation(table.num_rows)
                for start in range(0, table.num_rows, self.chunk_rows):  # the bucket, shuffled, as one shard
                    rows = table.take(order[start : start + self.chunk_rows])
                    self._write_chunk({name: to_numpy(rows.column(name).combine_chunks(), column)
                                       for name, column in self.columns.items()})
                del table, rows
            self._close_shard()
            self._bucket_path(i).unlink()
        return self.shards

    def _write_rows(self, batch: Columns | None) -> None:
        """Add rows (None: the last ones) and write every whole chunk they make; shards end at shard_rows."""
        if batch is not None:
            self._pending.append(batch)
        pending = sum(len(next(iter(b.values()))) for b in self._pending)
        if pending < self.chunk_rows and batch is not None:
            return
        joined = {k: np.concatenate([b[k] for b in self._pending]) for k in self.columns}
        whole = pending if batch is None else pending - pending % self.chunk_rows
        for start in range(0, whole, self.chunk_rows):
            self._write_chunk({k: v[start : min(start + self.chunk_rows, whole)] for k, v in joined.items()})
            if self._shard is not None and self._shard.rows >= self.shard_rows:
                self._close_shard()
        self._pending = [{k: v[whole:].copy() for k, v in joined.items()}] if whole < pending else []
        if batch is None:
            self._close_shard()

    def _write_chunk(self, chunk: Columns) -> None:
        if self._shard is None:
            self._shard = ShardFile(self.folder / f"{self.split}-{len(self.shards):05d}.arrow", self.schema)
        self._shard.write_chunk(chunk)

    def _close_shard(self) -> None:
        if self._shard is not None and self._shard.ranges:
            self.shards.append(self._shard.close())
        self._shard = None
