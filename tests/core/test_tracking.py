"""Issue 38: MLflow tracking on rank 0, read back from a real `mlflow server` (SQLite backend store) through MLflow's
client: parameters, metric histories, final results, files, one MLflow run across --resume, the local store of
run.mlflow, and an unreachable server. The trainers' tests check each flavour's logged model on the runs they train
(tracked by the session's server)."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient

from ddl_apps.core import tracking
from ddl_apps.core.metrics import read_metrics
from ddl_apps.core.redact import REDACTED
from ddl_apps.recipe import load_recipe
from tests.engine_runs import PROBE, REPO, ddl, summary, train
from tests.mlflow_server import free_port, mlflow_server, tracked_run
from tests.test_safety import HF_TOKEN


def test_params_are_the_config_flattened_with_long_values_cut():
    config = {"data": {"source": "x.csv", "columns": ["a", "b"], "rows": None}, "run": {"seed": 3, "mlflow": True},
              "description": "d" * 7000}
    flat = tracking.params(config)
    assert {k: v for k, v in flat.items() if k != "description"} == {
        "data.source": "x.csv", "data.columns": '["a", "b"]', "data.rows": "null", "run.seed": "3",
        "run.mlflow": "true"}
    assert len(flat["description"]) == tracking.PARAM_LIMIT and flat["description"].endswith(tracking.CUT)
    assert tracking.metric_key("baseline logistic (test)", "pr_auc") == "baseline logistic test/pr_auc"


def metric_points(run_dir) -> set[tuple[str, int, float]]:
    """Every value the run's metrics.jsonl holds, as (MLflow's key, step, value)."""
    return {(f"{row['split']}/{key}", row["step"], value) for row in read_metrics(run_dir)
            for key, value in row.items() if key not in ("split", "step", "time")}


def test_a_resumed_run_is_one_mlflow_run_with_its_params_metrics_results_and_files(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    secret = f"description=fetched with {HF_TOKEN}"
    run = train(tmp_path / "run", secret, "run.max_steps=30")
    stopped = tracked_run(mlflow_uri, run)
    assert stopped.info.status == "KILLED"  # (until --resume finishes it)
    resumed = ddl("train", PROBE, f"run.dir={run}", secret, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    # (--resume sets dist.batch_workers to the batch the run trained with)
    assert "MLflow keeps the parameters the run started with; changed since: dist.batch_workers, run.max_steps " \
        "(config.yaml holds the new values)" in resumed.stderr

    client, tracked = MlflowClient(mlflow_uri), tracked_run(mlflow_uri, run)
    run_id = tracked.info.run_id
    assert run_id == stopped.info.run_id and tracked.info.status == "FINISHED"
    assert [r.info.run_id for r in client.search_runs([tracked.info.experiment_id],
                                                      f"tags.`ddl.run_dir` = '{run}'")] == [run_id]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert tracked.data.params == {**tracking.params(config), "run.max_steps": "30", "dist.batch_workers": "null"}
    assert tracked.data.params["description"] == f"fetched with {REDACTED}"
    assert tracked.data.params["optim.lr"] == "0.05"

    expected = metric_points(run)
    assert {split for split, _, _ in expected} >= {"train/loss", "train/lr", "valid/accuracy"}
    logged = {(key, m.step, m.value) for key in {key for key, _, _ in expected}
              for m in client.get_metric_history(run_id, key)}
    assert logged == expected
    results = summary(run)["results"]["model (valid)"]
    assert {k: v for k, v in tracked.data.metrics.items() if k.startswith("model valid/")} == {
        f"model valid/{key}": value for key, value in results.items()}

    files = {a.path for a in client.list_artifacts(run_id)}
    assert files == {"config.yaml", "curves.png", "metrics.jsonl", "summary.json", "model"}
    assert {a.path for a in client.list_artifacts(run_id, "model")} == {"model/model.safetensors"}  # (no flavour)
    downloaded = client.download_artifacts(run_id, "config.yaml", str(tmp_path))
    assert HF_TOKEN not in open(downloaded).read()


def test_a_run_stopped_by_an_error_is_failed_with_what_it_logged(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    run = tmp_path / "run"
    result = ddl("train", PROBE, f"run.dir={run}", "optim.batch_size=32", "data.nan_examples=[700]")
    assert result.returncode == 2 and "the loss became NaN" in result.stderr, result.stderr
    client, tracked = MlflowClient(mlflow_uri), tracked_run(mlflow_uri, run)
    assert tracked.info.status == "FAILED"
    expected = metric_points(run)
    assert expected and {(key, m.step, m.value) for key in {key for key, _, _ in expected}
                         for m in client.get_metric_history(tracked.info.run_id, key)} == expected


def test_an_unreachable_server_is_one_warning_and_the_run_completes(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run = tmp_path / "run"
    result = ddl("train", PROBE, f"run.dir={run}", "optim.epochs=1")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "MLflow" in line or "mlflow" in line] == [
        f"warning: MLflow tracking at {uri} cannot be reached ([Errno 111] Connection refused); the run goes on "
        f"untracked, and {run} holds everything it records"]
    assert "Traceback" not in result.stderr
    assert summary(run)["results"] and not (run / tracking.RUN_FILE).exists()


def test_run_mlflow_tracks_into_a_local_store_under_the_working_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(REPO)}
    run = tmp_path / "runs" / "digits"
    result = subprocess.run([sys.executable, "-m", "ddl_apps.cli", "train", str(REPO / PROBE), f"run.dir={run}",
                             "optim.epochs=1", "run.mlflow=true"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not re.search(r"warning|deprecat|INFO|mlflow\.", result.stderr, re.IGNORECASE), result.stderr  # (quiet)
    store = tmp_path / "mlruns"
    tracked = tracked_run(f"sqlite:///{store / 'mlflow.db'}", run)
    assert tracked.info.status == "FINISHED" and tracked.data.params["run.mlflow"] == "true"
    assert (store / tracked.info.experiment_id / tracked.info.run_id / "artifacts" / "summary.json").read_text() == (
        run / "summary.json").read_text()
    assert json.loads((run / tracking.RUN_FILE).read_text())["tracking_uri"] == f"sqlite:///{store / 'mlflow.db'}"


def test_a_server_lost_mid_run_is_one_warning_and_tracking_stops_there(tmp_path):
    """The tracker as rank 0's run log drives it, against a server that stops between two log lines."""
    said: list[str] = []
    (tmp_path / "server").mkdir()
    with pytest.MonkeyPatch.context() as environment:
        for name, value in tracking.CLIENT_DEFAULTS.items():
            environment.setenv(name, value)
        with mlflow_server(tmp_path / "server") as uri:
            environment.setenv("MLFLOW_TRACKING_URI", uri)
            tracker = tracking.start(load_recipe(PROBE), tmp_path, said.append)
            tracker.metrics("train", 10, {"loss": 1.0})
        tracker.metrics("train", 20, {"loss": 0.5})
        tracker.close({"model (valid)": {"accuracy": 0.9}}, run_ended=True)
        tracker.close({"model (valid)": {"accuracy": 0.9}}, run_ended=True)  # (stopped: nothing more is tried)
    assert said == [f"warning: MLflow tracking at {uri} failed ([Errno 111] Connection refused); the run goes on "
                    f"untracked, and {tmp_path} holds everything it records"]
