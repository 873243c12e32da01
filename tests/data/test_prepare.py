"""Issue 33: what `ddl data prepare` and `data.prepared=auto` do with the folders they write, on a toy preparer in
one process: a user's folder is never replaced, a failed prepare leaves nothing, a damaged cached dataset is set
aside and prepared again."""

import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ddl_apps.core.contract import Preparer
from ddl_apps.data import prepare as prepare_module
from ddl_apps.data.config import AUTO
from ddl_apps.errors import DataError


class ToyData:
    prepared, cache_gb = AUTO, 0.0

    def model_dump(self, exclude=()):
        return {"rows": 6}


RECIPE = SimpleNamespace(trainer="toy", data=ToyData(), run=SimpleNamespace(seed=0))


def toy_preparer(fail: bool = False, first: int = 0) -> Preparer:
    """Six rows, `first` to `first` + 5, and a file beside them that says `first`."""
    def write(recipe, writer):
        writer.plan("train", 6)
        writer.add("train", {"x": np.arange(first, first + 6, dtype=np.int64)})
        writer.add_file("first.txt", str(first).encode())
        if fail:
            raise DataError("row 7 is not a number")
        return {}

    return Preparer(source=lambda recipe: {"path": "toy"}, write=write, columns={"train": {"x": "int64"}})


@pytest.mark.parametrize("manifest", [None, {"name": "my web app"}])
def test_a_folder_that_is_not_a_prepared_dataset_is_left_alone(tmp_path, manifest):
    """Not a dataset of this format (no manifest, or a manifest.json of something else): refused, nothing touched."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    if manifest is not None:
        (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="is not a prepared dataset of format .* nothing was changed"):
        prepare_module.prepare(RECIPE, toy_preparer(), str(folder))
    assert (folder / "thesis.txt").read_text() == "four years of work"


def test_a_prepared_dataset_is_replaced(tmp_path):
    folder = tmp_path / "data"
    prepare_module.prepare(RECIPE, toy_preparer(), str(folder))
    first = (folder / "manifest.json").read_text()
    prepare_module.prepare(RECIPE, toy_preparer(), str(folder))
    assert (folder / "manifest.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert json.loads(first)["splits"] == json.loads((folder / "manifest.json").read_text())["splits"]


def test_a_failed_prepare_leaves_nothing(tmp_path):
    with pytest.raises(DataError, match="row 7"):
        prepare_module.prepare(RECIPE, toy_preparer(fail=True), str(tmp_path / "data"))
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_auto_prepared_dataset_is_set_aside_and_prepared_again(tmp_path, monkeypatch, capfd):
    """The error's advice (prepare again) did nothing for the cache: `ddl data prepare` found the folder and
    returned. Now the workers that find it damaged (two threads here, as two workers of a host) set it aside once
    and prepare it again."""
    monkeypatch.setenv("DDL_CACHE", str(tmp_path))
    folder = Path(prepare_module.open_prepared(RECIPE, toy_preparer()).store.root)
    shard = next(folder.glob("train-*.arrow"))
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    os.utime(shard, ns=(1, 1))  # (damage comes later than the write: within one clock tick the file looks checked)
    opened = []
    workers = [threading.Thread(target=lambda: opened.append(prepare_module.open_prepared(RECIPE, toy_preparer())))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(opened) == 2 and all(dataset.store.root == str(folder) for dataset in opened)
    aside = list(folder.parent.glob(f".{folder.name}.damaged-*"))
    assert len(aside) == 1 and (aside[0] / shard.name).read_bytes() == bytes(damaged)
    assert shard.read_bytes() != bytes(damaged)
    assert capfd.readouterr().err.count("does not match the SHA-256") == 1


def test_a_running_job_reads_the_dataset_it_verified_while_it_is_prepared_again(tmp_path):
    """Preparing again into the folder a job reads swapped the folder under it: the job (reading its shards by path)
    trained on the new rows, its test split's among them. The job holds the files it verified open now: it reads
    the old rows and the old side file to its end; a job started afterwards reads the new ones."""
    from ddl_apps.data.dataset import PreparedDataset

    folder = tmp_path / "data"
    prepare_module.prepare(RECIPE, toy_preparer(first=0), str(folder))
    running = PreparedDataset(str(folder))
    running.verify()
    prepare_module.prepare(RECIPE, toy_preparer(first=100), str(folder))
    running.verify()
    assert sorted(running.split("train").load()["x"].tolist()) == [0, 1, 2, 3, 4, 5]  # (shuffled once)
    assert running.file("first.txt").read_text() == "0"
    later = PreparedDataset(str(folder))
    later.verify()
    assert sorted(later.split("train").load()["x"].tolist()) == [100, 101, 102, 103, 104, 105]
    assert later.file("first.txt").read_text() == "100"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # (the old files live on only while held)


def test_a_prepared_table_holds_what_training_reads_and_its_scratch_is_removed(tmp_path, monkeypatch):
    """A CSV is converted to Parquet to be read a column at a time: that copy of the raw table (every column, ids
    included) was written into the dataset, and uploaded with it. It lives in the cache's scratch now, removed."""
    from ddl_apps.recipe import load_recipe
    from ddl_apps.trainers.tabular.trainer import PREPARER

    monkeypatch.setenv("DDL_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    table = tmp_path / "customers.csv"
    table.write_text("customer,plan,spend,churned\n" + "".join(
        f"c{i:03d},{rng.choice(['a', 'b'])},{rng.normal():.3f},{rng.choice(['yes', 'no'])}\n" for i in range(300)))
    recipe = load_recipe("churn_tabm", [f"data.source={table}", "data.label=churned", "data.positive_label=yes",
                                        "data.id_column=customer", "data.categorical=[plan]"])
    folder = Path(prepare_module.prepare(recipe, PREPARER, str(tmp_path / "prepared")))
    manifest = json.loads((folder / "manifest.json").read_text())
    written = {shard["file"] for shards in manifest["splits"].values() for shard in shards} | {"manifest.json"}
    assert {p.name for p in folder.iterdir()} == written
    assert not any((tmp_path / "cache" / "scratch").iterdir())


def test_scoring_reads_a_table_as_preparing_did(tmp_path, monkeypatch):
    """`ddl predict` read CSVs with pandas, which makes NA and None missing, while preparing kept them as words:
    the same rows got category 0 (unknown) in scoring and their own in training. Ids came back as numbers (007 as
    7). Now both read through one reader: a row scores with the category it trained with, its id as written."""
    import pandas as pd
    import torch

    from ddl_apps.core.torch_engine import save_weights
    from ddl_apps.recipe import load_recipe
    from ddl_apps.trainers.tabular import data
    from ddl_apps.trainers.tabular.model import TabularModel
    from ddl_apps.trainers.tabular.trainer import PREPARER, predict_file

    monkeypatch.setenv("DDL_CACHE", str(tmp_path / "cache"))
    regions = ["NA", "None", "EU", ""] * 30
    table = tmp_path / "customers.csv"
    table.write_text("customer,region,spend,churned\n" + "".join(
        f"{i:03d},{region},{i % 7}.5,{'yes' if i % 3 else 'no'}\n" for i, region in enumerate(regions)))
    recipe = load_recipe("churn_tabm", [f"data.source={table}", "data.label=churned", "data.positive_label=yes",
                                        "data.id_column=customer", "data.categorical=[region]",
                                        "data.min_category_count=1"])
    folder = Path(prepare_module.prepare(recipe, PREPARER, str(tmp_path / "prepared")))
    pre = data.Preprocessor(**json.loads((folder / "manifest.json").read_text())["fitted"]["preprocessor"])
    assert set(pre.vocabularies["region"]) == {"NA", "None", "EU"}  # (a blank cell is missing: index 0)
    architecture = {"num_numeric": pre.num_features, "cardinalities": pre.cardinalities, "hidden": [4],
                    "embedding_dim": 2, "dropout": 0.0, "ensemble": 1, "periodic": None}
    model, model_dir = TabularModel(**architecture).eval(), tmp_path / "model"
    model_dir.mkdir()
    save_weights(model, model_dir)
    pre.save(model_dir / "preprocessing.json")
    (model_dir / "model.json").write_text(json.dumps({**architecture, "id": "customer", "label": "churned",
                                                      "score": "p"}))
    predict_file(model_dir, table, tmp_path / "scores.csv")
    scores = {line.split(",")[1]: float(line.split(",")[2])
              for line in (tmp_path / "scores.csv").read_text().splitlines()[1:]}
    assert "000" in scores and "007" in scores  # ids as written
    for row in (0, 1, 3):  # NA, None: their own categories; blank: unknown
        numeric, _ = pre.transform(pd.DataFrame({"spend": [f"{row % 7}.5"], "region": [regions[row] or None]}))
        index = pre.vocabularies["region"].index(regions[row]) + 1 if regions[row] else 0
        expected = model.probability(torch.from_numpy(numeric), torch.tensor([[index]])).item()
        assert scores[f"{row:03d}"] == pytest.approx(expected, rel=1e-5), regions[row]


def test_a_csv_column_is_typed_by_more_than_its_first_cells(tmp_path, monkeypatch):
    """A CSV's types were inferred from its first 64 MB: an integer column holding 12.5 further down, or one
    empty there, stopped the preparation with advice that could not help. Numbers are read as float64 and an
    empty start as text (parsed as numbers later)."""
    from ddl_apps.trainers.tabular import data

    monkeypatch.setattr(data, "CSV_BLOCK", 256)  # (the first 64 MB, scaled down)
    table = tmp_path / "t.csv"
    table.write_text("count,late,label\n" + "".join(f"{i},,{i % 2}\n" for i in range(100)) + "12.5,3,1\n")
    with data.Table(str(table)) as read:
        frame = read.file.read().to_pandas()
    assert frame["count"].iloc[-1] == 12.5 and data.column_numbers(frame["late"], "late", "t.csv")[0][-1] == 3.0


def test_a_split_is_read_for_the_columns_asked_a_few_chunks_at_a_time(tmp_path):
    """What the end of a run reads (file names and transcripts beside the audio, texts beside token ids, the test
    rows a baseline scores) was loaded whole, every column: memory grew with the split. Now a split is read for the
    columns asked, chunk by chunk, a few chunks held at a time."""
    import tracemalloc

    from ddl_apps.data.dataset import PreparedDataset

    rows, big = 3000, 2048  # 8 KiB of "audio" a row: 24 MiB in all, about 24 chunks

    def write(recipe, writer):
        writer.plan("test", rows)
        for start in range(0, rows, 500):
            writer.add("test", {"audio": np.full((500, big), start, dtype=np.float32),
                                "name": np.arange(start, start + 500, dtype=np.int64)})
        return {}

    preparer = Preparer(source=lambda recipe: {"path": "toy"}, write=write,
                        columns={"test": {"audio": "float32", "name": "int64"}})
    split = PreparedDataset(prepare_module.prepare(RECIPE, preparer, str(tmp_path / "data"))).split("test")
    assert len(split.chunks) >= 20
    tracemalloc.start()
    try:
        names = split.load(columns=["name"])
        seen = sum(len(batch["audio"]) for batch in split.batches(["audio"], threads=2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert list(names) == ["name"] and names["name"].tolist() == list(range(rows)) and seen == rows
    # A few 1 MiB chunks at a time: those read ahead, the one in use and their decoding buffers (6-7 MiB, as the
    # threads happen to run), a third of the split at most.
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB held for a 24 MiB split"
    assert split.load(max_rows=600, columns=["audio"])["audio"].shape[0] < rows  # (the first chunks only)


def test_a_shuffled_split_lets_go_of_its_buckets(tmp_path):
    """Each training bucket, turned into a shard, is unlinked; its writer kept the file open to the end, so the
    disk held the training split twice (a 25 GiB source ran out of disk at its last buckets)."""
    from ddl_apps.data.shards import SplitWriter, columns_of

    batch = {"x": np.arange(4000, dtype=np.int64)}
    writer = SplitWriter(tmp_path, "train", columns_of(batch), chunk_rows=100, shard_rows=1000,
                         expected_rows=4000, shuffle_seed=0)
    writer.add(batch)
    writer.finish()
    held = [os.readlink(fd) for fd in Path("/proc/self/fd").iterdir() if fd.is_symlink()]
    assert not [target for target in held if "-bucket-" in target], held
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"train-{i:05d}.arrow" for i in range(4)]
