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


def write_shard(path: Path, batch: Columns, schema: pa.Schema, chunk_rows: int) -> Shard:
    """`batch` as one shard file of chunks of `chunk_rows` rows, with each chunk's byte range and SHA-256."""
    rows = len(next(iter(batch.values())))
    ranges = []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(to_record_batch({k: v[:0] for k, v in batch.items()}, schema))  # the schema goes first,
        for start in range(0, rows, chunk_rows):  # so that every chunk's range holds its own message alone
            before = sink.tell()
            writer.write_batch(to_record_batch({k: v[start : start + chunk_rows] for k, v in batch.items()}, schema))
            ranges.append((before, sink.tell(), min(chunk_rows, rows - start)))
    data = path.read_bytes()
    chunks = [Chunk(offset=a, length=b - a, rows=n, sha256=hashlib.sha256(data[a:b]).hexdigest())
              for a, b, n in ranges]
    return Shard(file=path.name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), rows=rows, chunks=chunks)


class SplitWriter:
    """One split's rows, added batch by batch in bounded memory, written as shards of `shard_rows` rows.

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
        self._pending: list[Columns] = []
        self._rng = None if shuffle_seed is None else np.random.default_rng([shuffle_seed, 7])
        self._buckets: list[pa.ipc.RecordBatchStreamWriter] = []
        if self._rng is not None:
            count = max(1, math.ceil(expected_rows / self.shard_rows))
            self._buckets = [pa.ipc.new_stream(str(self._bucket_path(i)), self.schema) for i in range(count)]

    def _bucket_path(self, i: int) -> Path:
        return self.folder / f".{self.split}-bucket-{i:05d}.arrows"

    def add(self, batch: Columns) -> None:
        rows = len(next(iter(batch.values())))
        if self._rng is not None:
            bucket = self._rng.integers(len(self._buckets), size=rows)
            for i, writer in enumerate(self._buckets):
                picked = np.flatnonzero(bucket == i)
                if len(picked):
                    writer.write_batch(to_record_batch({k: v[picked] for k, v in batch.items()}, self.schema))
            return
        self._pending.append(batch)
        if sum(len(next(iter(b.values()))) for b in self._pending) >= self.shard_rows:
            joined = self._joined()
            self._write(joined, self.shard_rows)
            self._pending = [{k: v[self.shard_rows :] for k, v in joined.items()}]

    def finish(self) -> list[Shard]:
        if self._rng is None:
            joined = self._joined()
            if len(next(iter(joined.values()))):
                self._write(joined, len(next(iter(joined.values()))))
            return self.shards
        for writer in self._buckets:
            writer.close()
        for i in self._rng.permutation(len(self._buckets)):
            table = pa.ipc.open_stream(str(self._bucket_path(i))).read_all()
            bucket = {name: to_numpy(table.column(name).combine_chunks(), column)
                      for name, column in self.columns.items()}
            order = self._rng.permutation(table.num_rows)
            if table.num_rows:
                self._write({k: v[order] for k, v in bucket.items()}, table.num_rows)
            self._bucket_path(i).unlink()
        return self.shards

    def _joined(self) -> Columns:
        return {k: np.concatenate([b[k] for b in self._pending]) for k in self.columns}

    def _write(self, batch: Columns, rows: int) -> None:
        path = self.folder / f"{self.split}-{len(self.shards):05d}.arrow"
        self.shards.append(write_shard(path, {k: v[:rows] for k, v in batch.items()}, self.schema, self.chunk_rows))

