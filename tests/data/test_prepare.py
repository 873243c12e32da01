"""Issue 33: what `ddl data prepare` and `data.prepared=auto` do with the folders they write, on a toy preparer in
one process: a user's folder is never replaced, a failed prepare leaves nothing, a damaged cached dataset is set
aside and prepared again."""

import json
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


def toy_preparer(fail: bool = False) -> Preparer:
    def write(recipe, writer):
        writer.plan("train", 6)
        writer.add("train", {"x": np.arange(6, dtype=np.int64)})
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
