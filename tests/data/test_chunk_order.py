"""Issue 22: the order a prepared split is streamed in, and how its shards are written. Unit tests, one process."""

import numpy as np
import pytest

from ddl_apps.core import sharding
from ddl_apps.data.dataset import LaneOrder
from ddl_apps.data.shards import SplitWriter, columns_of, decode_chunk, schema_of


def chunked(rows_per_chunk: list[int]) -> np.ndarray:
    return np.array(rows_per_chunk, dtype=np.int64)


@pytest.mark.parametrize("lanes", [1, 4, 16])
def test_an_epoch_visits_each_row_at_most_once_and_drops_less_than_a_step(lanes):
    chunk_rows = chunked([1000] * 9 + [517])
    order = LaneOrder(chunk_rows, seed=3, epoch=1, lanes=lanes, global_batch=128)
    steps = sharding.steps_per_epoch(int(chunk_rows.sum()), 128)
    rows = np.concatenate([order.step_rows(s) for s in range(steps)])
    assert len(rows) == steps * 128 and len(np.unique(rows)) == len(rows)
    assert rows.min() >= 0 and rows.max() < chunk_rows.sum()


def test_epochs_differ_and_a_seed_repeats():
    chunk_rows = chunked([300] * 20)
    first, again = (LaneOrder(chunk_rows, 0, 0, 16, 64).step_rows(5) for _ in range(2))
    other_epoch = LaneOrder(chunk_rows, 0, 1, 16, 64).step_rows(5)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_epoch)


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_each_worker_reads_about_its_share_of_the_chunks(workers):
    """Over an epoch, with the worker count dividing the lanes, a worker's examples lie in about 1/N of the chunks
    (at most one chunk per lane more, where two lanes share one)."""
    chunk_rows = chunked([1024] * 256)
    order = LaneOrder(chunk_rows, seed=0, epoch=0, lanes=16, global_batch=512)
    first_row = np.concatenate([[0], np.cumsum(chunk_rows)])
    touched: list[set[int]] = [set() for _ in range(workers)]
    for step in range(sharding.steps_per_epoch(int(chunk_rows.sum()), 512)):
        for rank in range(workers):
            share = sharding.rank_step_batches(order.step_rows(step), 0, 512, rank, workers, 1)[0]
            touched[rank].update(np.searchsorted(first_row, share, side="right") - 1)
    for chunks in touched:
        assert len(chunks) <= 256 / workers + 16 / workers, (workers, len(chunks))


def test_the_shares_of_a_step_do_not_depend_on_the_number_of_workers():
    """np=2 and np=4 cut the same step: together their shares are the step's rows, in the step's order."""
    order = LaneOrder(chunked([700] * 12), seed=1, epoch=2, lanes=8, global_batch=96)
    step = order.step_rows(7)
    for workers in (1, 2, 3, 4):
        shares = [sharding.rank_step_batches(step, 0, 96, rank, workers, 2) for rank in range(workers)]
        np.testing.assert_array_equal(np.concatenate([b for share in shares for b in share]), step)


@pytest.mark.parametrize("shuffle", [None, 5])
def test_a_split_writer_keeps_every_row_once(tmp_path, shuffle):
    rows = 10_000
    batch = {"x": np.arange(rows * 3, dtype=np.float32).reshape(rows, 3), "y": np.arange(rows),
             "none": np.zeros((rows, 0), dtype=np.int64)}  # a table without categorical columns has these
    writer = SplitWriter(tmp_path, "train", columns_of(batch), chunk_rows=300, shard_rows=2400,
                         expected_rows=rows, shuffle_seed=shuffle)
    for start in range(0, rows, 777):
        writer.add({k: v[start : start + 777] for k, v in batch.items()})
    shards = writer.finish()
    assert sum(s.rows for s in shards) == rows and all(c.rows <= 300 for s in shards for c in s.chunks)
    schema_columns = columns_of(batch)
    read = []
    for shard in shards:
        data = (tmp_path / shard.file).read_bytes()
        for chunk in shard.chunks:
            read.append(decode_chunk(data[chunk.offset : chunk.offset + chunk.length], schema_of(schema_columns),
                                     schema_columns))
    y = np.concatenate([c["y"] for c in read])
    x = np.concatenate([c["x"] for c in read])
    np.testing.assert_array_equal(x[:, 0], y * 3)  # rows stay whole
    assert all(c["none"].shape == (len(c["y"]), 0) and c["none"].dtype == np.int64 for c in read)
    if shuffle is None:
        np.testing.assert_array_equal(y, np.arange(rows))
    else:
        assert sorted(y.tolist()) == list(range(rows)) and not np.array_equal(y, np.arange(rows))
        assert not list(tmp_path.glob(".*bucket*"))


def test_a_step_that_needs_more_chunks_than_are_kept_still_gets_them_all(tmp_path):
    """A batch drawn from every chunk (as a full permutation draws) while the supply keeps 4: each is read."""
    from ddl_apps.data.dataset import ChunkSupply

    class Reader:  # 12 chunks of 10 rows; row r holds the value r
        first_row = np.arange(0, 130, 10)
        chunks = list(range(12))

        def locate(self, rows):
            return rows // 10, rows % 10

        def read_chunk(self, index):
            return {"x": np.arange(index * 10, index * 10 + 10)}

    rows = np.random.default_rng(0).permutation(120)[:50]
    supply = ChunkSupply(Reader(), keep=4)  # type: ignore[arg-type]
    np.testing.assert_array_equal(supply.gather(rows)["x"], rows)
    np.testing.assert_array_equal(supply.gather(rows[::-1])["x"], rows[::-1])


def test_a_full_permutation_needs_the_split_in_memory():
    from ddl_apps.errors import RecipeError
    from ddl_apps.recipe import load_recipe

    with pytest.raises(RecipeError, match="set data.stream=false"):
        load_recipe("fraud_mlp", ["data.shuffle=full"])
    assert load_recipe("fraud_mlp", ["data.shuffle=full", "data.stream=false"]).data.shuffle == "full"
