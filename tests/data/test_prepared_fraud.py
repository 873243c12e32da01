"""Issue 22: the fraud recipe prepared once (`ddl data prepare`) and streamed by each worker, from a folder and from
a local S3-compatible server; every bad input named, with exit code 2 and no run directory."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ddl_apps.cache import cache_dir
from ddl_apps.core.checkpoint import list_checkpoints
from tests.data.s3_server import free_port, s3_server
from tests.engine_runs import REPO, ddl, final_weights, kill_training, start_training, summary, train

SLICE = ("data.rows=6000", "model.dropout=0", "model.baselines=[]", "optim.epochs=2", "optim.warmup_steps=5",
         "dist.scale_lr=false", "run.log_every=5")  # 4,200 training rows: 32 steps of 128 an epoch
FRAUD = "fraud_mlp"


def assert_close(actual, expected, rtol=1e-5):
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rtol * scale, np.abs(actual - expected).max() / scale


def prepare(output: str, *overrides: str) -> subprocess.CompletedProcess:
    return ddl("data", "prepare", FRAUD, *SLICE, *overrides, "-o", output)


# The recipe's own categorical columns, overridden as a user would: brackets (which the console read as markup) and
# spaces (which need quoting) in the command `ddl data prepare` prints
CATEGORICAL = "data.categorical=[ProductCD, card1, card2, card3, card5, addr1, addr2, R_emaildomain, DeviceInfo, " \
              "id_16, id_27]"


@pytest.fixture(scope="module")
def prepared_and_printed(tmp_path_factory) -> tuple[Path, list[str]]:
    """The prepared folder, and the command `ddl data prepare` printed to train from it."""
    folder = tmp_path_factory.mktemp("prepared") / "fraud"
    result = prepare(str(folder), CATEGORICAL)
    assert result.returncode == 0, result.stderr
    printed = result.stderr.split("train from it with: ", 1)[1].splitlines()[0]
    return folder, shlex.split(printed)


@pytest.fixture(scope="module")
def prepared(prepared_and_printed) -> Path:
    return prepared_and_printed[0]


@pytest.fixture(scope="module")
def reference(prepared_and_printed, tmp_path_factory) -> Path:
    """One worker, global batch 128, streamed from the prepared folder: the printed command, run as printed."""
    folder, command = prepared_and_printed
    assert command == ["ddl", "train", FRAUD, *SLICE, CATEGORICAL, f"data.prepared={folder}"]
    return train(tmp_path_factory.mktemp("reference") / "run", *command[3:], "optim.batch_size=128", recipe=FRAUD)


def test_prepare_writes_a_manifest_with_each_shard_and_chunk(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["trainer"] == "tabular" and manifest["settings"]["rows"] == 6000
    rows = {split: sum(s["rows"] for s in shards) for split, shards in manifest["splits"].items()}
    assert rows == {"train": 4200, "valid": 600, "test": 1200}
    for shards in manifest["splits"].values():
        for shard in shards:
            assert (prepared / shard["file"]).stat().st_size == shard["bytes"]
            assert sum(c["rows"] for c in shard["chunks"]) == shard["rows"]
    assert manifest["columns"]["train"]["numeric"]["dtype"] == "float32"
    assert manifest["fitted"]["preprocessor"]["medians"]


@pytest.mark.distributed
def test_two_workers_resumed_mid_epoch_train_as_one_worker_with_twice_the_batch(prepared, reference, tmp_path):
    run = tmp_path / "run"
    train(run, *SLICE, f"data.prepared={prepared}", "optim.batch_size=64", "run.max_steps=45", np=2, recipe=FRAUD)
    train(run, *SLICE, f"data.prepared={prepared}", "optim.batch_size=64", np=2, recipe=FRAUD, flags=("--resume",))
    assert summary(run)["steps"] == summary(reference)["steps"] == 64
    assert_close(final_weights(run), final_weights(reference))


def test_streamed_trains_as_loaded_into_memory(prepared, reference, tmp_path):
    """The same examples in the same steps, read whole into memory first: the same weights."""
    run = train(tmp_path / "run", *SLICE, f"data.prepared={prepared}", "data.stream=false", "optim.batch_size=128",
                recipe=FRAUD)
    assert_close(final_weights(run), final_weights(reference))


@pytest.mark.distributed
def test_a_killed_job_resumes_on_prepared_data_exactly(prepared, reference, tmp_path):
    run, args = tmp_path / "run", (*SLICE, f"data.prepared={prepared}", "optim.batch_size=64", "run.checkpoint_every=5")
    with start_training(run, FRAUD, *args, "-np", "2") as job:
        deadline = time.monotonic() + 300
        while (not list_checkpoints(run / "checkpoints") or list_checkpoints(run / "checkpoints")[-1].name <
               "step-00000040") and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.01)
        kill_training(run)
        job.wait(timeout=60)
    assert list_checkpoints(run / "checkpoints") and not (run / "model").exists()
    train(run, *args, np=2, recipe=FRAUD, flags=("--resume",))
    assert_close(final_weights(run), final_weights(reference))


# Slow because it must: three runs (prepared, reused at np=2, prepared anew) on the real table.
def test_auto_prepares_once_into_the_cache_and_reuses_it(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "datasets").symlink_to(cache_dir("datasets"))  # the IEEE-CIS table, already converted
    monkeypatch.setenv("DDL_CACHE", str(cache))

    def prepared() -> list[Path]:
        return sorted(p for p in (cache / "prepared" / "tabular").iterdir() if not p.name.startswith("."))

    first = train(tmp_path / "first", *SLICE, "optim.batch_size=128", "run.max_steps=3", recipe=FRAUD)
    assert len(prepared()) == 1 and (prepared()[0] / "manifest.json").exists()
    assert list_checkpoints(first / "checkpoints")[-1].name == "step-00000003"
    written = (prepared()[0] / "manifest.json").stat().st_mtime_ns
    train(tmp_path / "second", *SLICE, "optim.batch_size=64", "data.lanes=4", "run.max_steps=3", np=2, recipe=FRAUD)
    assert len(prepared()) == 1 and (prepared()[0] / "manifest.json").stat().st_mtime_ns == written  # reused
    train(tmp_path / "third", *SLICE, "data.rows=5000", "run.max_steps=3", recipe=FRAUD)
    assert len(prepared()) == 2  # another data section: prepared anew


def test_a_killed_prepare_leaves_nothing_that_looks_complete_and_running_it_again_finishes(tmp_path):
    """SIGKILL `ddl data prepare` while it writes the training buckets (100,000 rows of the IEEE-CIS table: a few
    seconds of them); then prepare again."""
    target = tmp_path / "fraud"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "ddl_apps.cli", "data", "prepare", FRAUD, "data.rows=100000", "-o", str(target)]
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as job:
        staging = tmp_path / ".fraud.partial"
        deadline = time.monotonic() + 120
        while not list(staging.glob(".train-bucket-*")) and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.01)
        job.send_signal(signal.SIGKILL)
    assert list(staging.glob(".train-bucket-*")) and not target.exists()  # killed amid the buckets
    result = ddl("data", "prepare", FRAUD, "data.rows=100000", "-o", str(target))
    assert result.returncode == 0, result.stderr
    assert (target / "manifest.json").exists() and not staging.exists()
    assert "prepared train 70,000, valid 10,000, test 20,000 rows" in result.stderr


# ---- bad input ----------------------------------------------------------------------------------------------
def damaged_copy(prepared: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    damage(copy, manifest)
    return copy


def edit_manifest(**changes):
    def damage(copy, manifest):
        for key, value in changes.items():
            manifest[key] = value
        (copy / "manifest.json").write_text(json.dumps(manifest))
    return damage


def truncate(copy, manifest):
    shard = copy / manifest["splits"]["train"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])


def alter(copy, manifest):
    shard = copy / manifest["splits"]["valid"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def remove(copy, manifest):
    (copy / manifest["splits"]["test"][0]["file"]).unlink()


def other_schema(copy, manifest):
    manifest["columns"]["valid"]["label"]["dtype"] = "int64"
    (copy / "manifest.json").write_text(json.dumps(manifest))


BAD_PREPARED = {
    "truncated shard": (truncate, "train-00000.arrow has"),
    "altered shard": (alter, "valid-00000.arrow does not match the SHA-256"),
    "missing shard": (remove, "test-00000.arrow is missing"),
    "another trainer": (edit_manifest(trainer="recsys"), "was prepared for the 'recsys' trainer, not 'tabular'"),
    "another version": (edit_manifest(ddl_apps="0.0.9"), "was prepared by ddl_apps 0.0.9"),
    "another schema": (other_schema, "holds valid columns"),
    "not a manifest": (edit_manifest(format="something/2"), "is not a ddl_apps prepared dataset"),
}


@pytest.mark.parametrize("case", sorted(BAD_PREPARED))
def test_bad_prepared_data_gives_one_clear_error(case, prepared, tmp_path):
    damage, expected = BAD_PREPARED[case]
    copy = damaged_copy(prepared, tmp_path, damage)
    result = ddl("train", FRAUD, *SLICE, f"data.prepared={copy}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_data_prepared_with_another_data_section_is_refused(prepared, tmp_path):
    result = ddl("train", FRAUD, *SLICE, "data.rows=5000", f"data.prepared={prepared}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "other data settings than this recipe's (differing: rows)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_prepare_refuses_a_folder_that_is_not_a_prepared_dataset(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = prepare(str(tmp_path / "mine"))
    assert result.returncode == 2 and "is not a prepared dataset" in result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---- object storage -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    with s3_server("ddl-data") as aws:
        yield aws


# Slow because it must: prepared into a bucket served by a local S3 server, then trained from it at np=2.
@pytest.mark.distributed
def test_train_from_a_local_s3_server(s3, reference, tmp_path, monkeypatch):
    """Prepared into the bucket, trained from it on 2 workers: the weights of the local run; the chunks land in the
    local cache; the credentials appear nowhere in the run directory."""
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DDL_CACHE", str(tmp_path / "cache"))
    url = "s3://ddl-data/fraud/v1"
    result = prepare(url)
    assert result.returncode == 0, result.stderr
    run = train(tmp_path / "run", *SLICE, f"data.prepared={url}", "optim.batch_size=64", np=2, recipe=FRAUD)
    assert_close(final_weights(run), final_weights(reference))
    assert len(list((tmp_path / "cache" / "shard-cache").iterdir())) > 0
    secret = s3["AWS_SECRET_ACCESS_KEY"].encode()
    assert not [p for p in run.rglob("*") if p.is_file() and secret in p.read_bytes()]


@pytest.mark.parametrize("case", ["wrong secret", "no such bucket", "unreachable endpoint"])
def test_storage_failures_give_one_clear_error(case, s3, tmp_path, monkeypatch):
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    url = "s3://ddl-data/fraud/v1"
    if case == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        expected = "was denied"
    elif case == "no such bucket":
        url, expected = "s3://no-such-bucket/fraud", "is missing"
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        expected = "cannot reach"
    result = ddl("train", FRAUD, *SLICE, f"data.prepared={url}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and expected in result.stderr and "AWS_ENDPOINT_URL" in result.stderr, \
        result.stderr
    assert "Traceback" not in result.stderr and "not-the-secret" not in result.stderr
    assert not (tmp_path / "run").exists()
