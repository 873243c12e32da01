"""Issues 5 and 24: the tabular trainer on the fraud recipe end to end, its scoring, its preprocessing, and its
errors on bad input."""

import json

import numpy as np
import pandas as pd
import pytest

from ddl_apps.core.rundir import load_run_recipe
from ddl_apps.recipe import load_recipe
from ddl_apps.trainers.tabular import data
from tests.engine_runs import ddl, summary, train
from tests.trainers.onnx_checks import exported, largest_difference, table_inputs

SLICE = ("data.rows=20000", "optim.epochs=1", "optim.batch_size=256", "optim.warmup_steps=5", "run.log_every=10")


@pytest.fixture(scope="module")
def ieee_sample():
    """20,000 real IEEE-CIS transactions, as a user's own CSV would hold them."""
    return pd.read_parquet(data.shipped_path(data.IEEE_CIS)).sample(n=20000, random_state=1)


def assert_complete_run(run_dir):
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "summary.json", "test_outputs.npz",
                 "model/model.safetensors", "model/preprocessing.json", "model/model.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run_dir / "checkpoints").glob("step-*/manifest.json"))
    results = summary(run_dir)["results"]
    for row in ("model (test)", "baseline gradient_boosting (test)", "baseline logistic (test)"):
        assert 0 < results[row]["pr_auc"] <= 1 and 0.5 < results[row]["roc_auc"] <= 1, results


@pytest.fixture(scope="module")
def own_csv_run(ieee_sample, tmp_path_factory):
    """A run on the sample written as a user's own CSV (other names for the label, id and time columns)."""
    folder = tmp_path_factory.mktemp("own")
    own = ieee_sample.rename(columns={"isFraud": "label", "TransactionID": "txn", "TransactionDT": "t"})
    csv = folder / "transactions.csv"
    own.to_csv(csv, index=False)
    return train(folder / "run", *SLICE, f"data.source={csv}", "data.label=label", "data.id_column=txn",
                 "data.time_column=t", recipe="fraud_mlp"), own, csv


def test_bring_your_own_csv_single_process(own_csv_run, tmp_path):
    run, own, csv = own_csv_run
    assert_complete_run(run)
    scores = tmp_path / "scores.csv"
    assert ddl("predict", str(run), str(csv), "-o", str(scores)).returncode == 0
    written = pd.read_csv(scores)
    assert list(written.columns) == ["rank", "txn", "fraud_probability"] and len(written) == len(own)
    assert written["fraud_probability"].between(0, 1).all() and written["fraud_probability"].is_monotonic_decreasing
    assert written["rank"].tolist() == list(range(1, len(own) + 1)) and set(written["txn"]) == set(own["txn"])


@pytest.mark.distributed
def test_two_workers_and_predict_reproduces_evaluation(tmp_path):
    run = tmp_path / "run"
    launched = ddl("train", "fraud_mlp", f"run.dir={run}", *SLICE, "-np", "2")
    assert launched.returncode == 0, launched.stderr
    assert_complete_run(run)
    assert_a_log_fit_for_a_file(launched.stderr, summary(run))
    digests = summary(run)["weights_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]

    recipe = load_run_recipe(run)
    with data.Table(recipe.data.source) as table:  # (the splits, as preparing drew them)
        label = data.LabelCoding.of(table.column("isFraud"), recipe.data).encode(table.column("isFraud"), recipe.data)
        assignment = data.split_rows(table, label, recipe.data, recipe.run.seed)
    test_rows = pd.read_parquet(data.shipped_path(data.IEEE_CIS))[assignment == 2]  # the test split
    rows = tmp_path / "test_rows.parquet"
    test_rows.to_parquet(rows)
    result = ddl("predict", str(run), str(rows), "-o", str(tmp_path / "scores.csv"))
    assert result.returncode == 0, result.stderr
    scored = pd.read_csv(tmp_path / "scores.csv").set_index("TransactionID")  # ranked: matched by id
    evaluated = np.load(run / "test_outputs.npz")
    np.testing.assert_allclose(scored.loc[test_rows["TransactionID"], "fraud_probability"], evaluated["score"],
                               atol=1e-6)

    metrics = json.loads(ddl("eval", str(run)).stdout)
    assert metrics["pr_auc"] == pytest.approx(summary(run)["results"]["model (test)"]["pr_auc"], abs=1e-6)


def test_onnx_export_scores_the_test_split_as_the_framework_did(own_csv_run, tmp_path):
    """Issue 38: the fraud model from raw columns (107 numbers, 11 categories) to the score."""
    run, own, csv = own_csv_run
    session, metadata = exported(run, tmp_path / "fraud.onnx")
    assert metadata["id_column"] == "txn" and metadata["score_column"] == "fraud_probability"
    recipe = load_run_recipe(run)
    with data.Table(str(csv)) as table:  # (the splits, as preparing drew them)
        label = data.LabelCoding.of(table.column("label"), recipe.data).encode(table.column("label"), recipe.data)
        assignment = data.split_rows(table, label, recipe.data, recipe.run.seed)
    inputs = {name: v[assignment == 2] for name, v in table_inputs(csv, metadata).items()}
    [score] = session.run(None, inputs)  # the whole test split (3,000 rows; the export's example had 8)
    evaluated = np.load(run / "test_outputs.npz")["score"]  # PyTorch's, in the final evaluation
    assert largest_difference(score, evaluated) < 1e-6  # measured: 6.0e-08


def assert_a_log_fit_for_a_file(log: str, written: dict) -> None:
    """Issue 34, item 5: a log that is not a terminal's (a file under SLURM) is complete and plain. The summary was
    cut to 80 columns (`recall…`, `baseli…`); now every metric and row is named whole, no control codes, and a line
    says which host each rank ran on."""
    assert "\x1b" not in log and "…" not in log
    table = log[log.index("run summary"):]
    for row, metrics in written["results"].items():
        assert row in table and all(metric in table for metric in metrics), (row, table)
    hosts = written["hosts_by_rank"]
    assert len(hosts) == 2 and f"2 workers: ranks 0, 1 on {hosts[0]}" in log


def test_preprocessing_is_fitted_on_training_rows_only():
    train_rows = pd.DataFrame({"amount": [1.0, 2.0, np.nan, 4.0], "card": [404, 404.0, 7, np.nan]})
    cfg = load_recipe("fraud_mlp", ["data.min_category_count=1"]).data
    pre = data.Preprocessor.fit(train_rows, ["amount"], ["card"], cfg)
    assert pre.medians == [pytest.approx(np.log1p(2.0))]
    assert pre.vocabularies["card"] == ["404", "7"] and pre.counts["card"] == [2, 1]
    future = pd.DataFrame({"amount": [1000.0, np.nan], "card": ["404", 999]})
    numeric, categories = pre.transform(future)
    assert categories[:, 0].tolist() == [1, 0]  # "404" from text is 404.0 from numbers; 999 is unknown
    assert numeric[1, 0] == pytest.approx((np.log1p(2.0) - pre.means[0]) / pre.scales[0])
    assert numeric[:, 1].tolist() == [0.0, 1.0]  # missing-value indicator
    assert pre.medians == [pytest.approx(np.log1p(2.0))]  # scoring changed nothing


BAD_DATA = {
    "missing_label": ({"data.label": "is_fraud"}, "has no column 'is_fraud'"),
    "text_as_numeric": ({"data.categorical": "[]"}, "numeric column 'ProductCD' is mostly text"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_gives_one_clear_error(case, ieee_sample, tmp_path):
    csv = tmp_path / "t.csv"
    ieee_sample.head(500).to_csv(csv, index=False)
    overrides, expected = BAD_DATA[case]
    result = ddl("train", "fraud_mlp", f"data.source={csv}", f"run.dir={tmp_path / 'run'}",
                 *(f"{k}={v}" for k, v in overrides.items()))
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_label_must_be_binary(ieee_sample, tmp_path):
    broken = ieee_sample.head(500).copy()
    broken.loc[broken.index[:3], "isFraud"] = 2
    broken.to_csv(tmp_path / "t.csv", index=False)
    result = ddl("train", "fraud_mlp", f"data.source={tmp_path / 't.csv'}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "must hold two values for a binary classifier; it holds 3" in result.stderr
    assert "'2' (3 rows)" in result.stderr and not (tmp_path / "run").exists()


def test_missing_data_file_and_unreadable_model(tmp_path):
    result = ddl("train", "fraud_mlp", f"data.source={tmp_path / 'none.csv'}")
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = ddl("predict", str(tmp_path), "x.csv", "-o", "y.csv")
    assert result.returncode == 2 and "not a run directory" in result.stderr


@pytest.mark.distributed
@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
def test_a_worker_error_reaches_the_user_as_is(controller, tmp_path):
    result = ddl("train", "fraud_mlp", "-np", "2", controller, f"data.source={tmp_path / 'none.csv'}",
                 f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "does not exist; set data.source" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
