"""Issue 24: the churn recipe on the tabular trainer (labels of any two values, numbers stored as text, stratified
split, the figures and charts churn teams read, ranked scores) and its errors on bad input."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from ddl_apps.core.rundir import load_run_recipe
from ddl_apps.errors import DataError
from ddl_apps.recipe import load_recipe
from ddl_apps.trainers.tabular import data, onnx_graph
from ddl_apps.trainers.tabular.model import TabularModel
from ddl_apps.trainers.tabular.trainer import baseline_scores, binary_metrics, captured
from tests.engine_runs import ddl, summary, train
from tests.mlflow_server import logged_model, tracked_run
from tests.trainers.onnx_checks import exported, largest_difference, table_inputs

CHURN = "churn_tabm"
QUICK = ("optim.epochs=1", "model.baselines=[]", "run.log_every=10")


@pytest.fixture(scope="module")
def churn_table():
    """The IBM Telco table as the shipped copy holds it (Churn: Yes/No; TotalCharges: text with blank cells)."""
    return pd.read_csv(data.shipped_path(data.TELCO_CHURN), dtype={"TotalCharges": str}, keep_default_na=False)


@pytest.fixture(scope="module")
def churn_run(tmp_path_factory, mlflow_uri):
    """Tracked in MLflow; the process prints each module it imports into imports.txt beside the run."""
    run = tmp_path_factory.mktemp("churn") / "run"
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        environment.setenv("PYTHONPROFILEIMPORTTIME", "1")
        result = ddl("train", CHURN, f"run.dir={run}", "optim.epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    (run.parent / "imports.txt").write_text(result.stderr)
    return run


def test_the_tracked_model_scores_as_the_run_did_without_importing_tensorflow(churn_run, mlflow_uri):
    """Issue 38: the charts among the MLflow run's files, and the model in MLflow's pytorch flavour (torch.export's
    graph, no pickle) scores its input example, the first test rows, as the run's own evaluation did; neither the
    run nor its tracking imported TensorFlow or Keras."""
    imported = {line.rsplit("|", 1)[-1].strip() for line in (churn_run.parent / "imports.txt").read_text().splitlines()
                if line.startswith("import time:")}
    assert any(name.startswith("mlflow.pytorch") for name in imported)  # (the profile covers the logging)
    assert not imported & {"tensorflow", "keras"}
    client, run_id = MlflowClient(mlflow_uri), tracked_run(mlflow_uri, churn_run).info.run_id
    assert {"gains.png", "calibration.png", "curves.png", "summary.json"} <= {a.path for a in client.list_artifacts(
        run_id)}
    model, inputs = logged_model(mlflow_uri, churn_run)
    example = model.input_example
    assert inputs.is_tensor_spec() and inputs.inputs[0].shape == (-1, example.shape[1])
    scores = np.load(churn_run / "test_outputs.npz")["score"]
    np.testing.assert_allclose(model.predict(example), scores[: len(example)], atol=1e-6)


def held_out_rows(run) -> pd.DataFrame:
    """The rows of the shipped table in the run's test split, as preparing drew them."""
    recipe = load_run_recipe(run)
    with data.Table(recipe.data.source) as table:
        label = data.LabelCoding.of(table.column("Churn"), recipe.data).encode(table.column("Churn"), recipe.data)
        assignment = data.split_rows(table, label, recipe.data, recipe.run.seed)
    return pd.read_csv(data.shipped_path(data.TELCO_CHURN))[assignment == 2]


def test_churn_end_to_end_and_ranked_scores_reproduce_the_evaluation(churn_run, tmp_path):
    run = churn_run
    for name in ("gains.png", "calibration.png", "curves.png", "test_outputs.npz", "model/model.json"):
        assert (run / name).stat().st_size > 0, name
    results = summary(run)["results"]
    for row in ("model (test)", "baseline gradient_boosting (test)", "baseline logistic (test)"):
        figures = results[row]
        assert figures["roc_auc"] > 0.75 and 0 < figures["brier"] < 0.2, (row, figures)
        assert figures["top_decile_lift"] > 2 and figures["top_decile_capture"] == pytest.approx(
            figures["top_decile_lift"] / 10, rel=0.01), (row, figures)  # (the whole rows nearest a tenth)

    recipe = load_run_recipe(run)
    with data.Table(recipe.data.source) as table:  # (the splits, as preparing drew them)
        label = data.LabelCoding.of(table.column("Churn"), recipe.data).encode(table.column("Churn"), recipe.data)
        assignment = data.split_rows(table, label, recipe.data, recipe.run.seed)
    assert [label[assignment == code].mean() for code in range(3)] == pytest.approx([label.mean()] * 3, abs=0.005)
    test_rows = tmp_path / "test.csv"
    pd.read_csv(data.shipped_path(data.TELCO_CHURN))[assignment == 2].to_csv(test_rows, index=False)
    result = ddl("predict", str(run), str(test_rows), "-o", str(tmp_path / "scores.csv"))
    assert result.returncode == 0, result.stderr
    scored = pd.read_csv(tmp_path / "scores.csv")
    assert list(scored.columns) == ["rank", "customerID", "churn_probability"]
    assert scored["churn_probability"].is_monotonic_decreasing and scored["rank"].tolist() == list(
        range(1, len(scored) + 1))
    evaluated = np.load(run / "test_outputs.npz")
    by_customer = scored.set_index("customerID")["churn_probability"]
    np.testing.assert_allclose(by_customer[pd.read_csv(test_rows)["customerID"]], evaluated["score"], atol=1e-6)


def test_onnx_export_scores_the_test_split_as_the_framework_did(churn_run, tmp_path):
    """Issue 38: raw columns in (numbers with NaN for missing cells, categories as text), the score out; the
    preprocessing runs inside the graph."""
    session, metadata = exported(churn_run, tmp_path / "churn.onnx")
    pre = data.Preprocessor.load(churn_run / "model" / "preprocessing.json")
    assert metadata["numeric_columns"] == pre.numeric and metadata["categorical_columns"] == list(pre.vocabularies)
    assert metadata["score_column"] == "churn_probability"
    held_out_rows(churn_run).to_csv(tmp_path / "test.csv", index=False)
    inputs = table_inputs(tmp_path / "test.csv", metadata)
    [score] = session.run(None, inputs)  # the whole test split (1,409 rows; the export's example had 8)
    evaluated = np.load(churn_run / "test_outputs.npz")["score"]  # PyTorch's, in the final evaluation
    assert largest_difference(score, evaluated) < 1e-6  # measured: 1.2e-07
    one_row = [session.run(None, {name: v[i : i + 1] for name, v in inputs.items()})[0] for i in range(3)]
    np.testing.assert_allclose(np.concatenate(one_row), score[:3], atol=1e-7)


@pytest.mark.distributed
def test_two_workers_train_identical_weights_with_periodic_embeddings(tmp_path):
    run = train(tmp_path / "run", *QUICK, "data.rows=3000", "model.periodic={frequencies: 4, width: 4}", np=2,
                recipe=CHURN)
    digests = summary(run)["weights_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]


LABELS = {  # the same labels, written as users' tables write them
    "yes_no": ({"Yes": "Yes", "No": "No"}, ()),
    "numbers": ({"Yes": 1, "No": 0}, ()),
    "booleans": ({"Yes": "true", "No": "false"}, ()),
    "words": ({"Yes": "churned", "No": "stayed"}, ("data.positive_label=churned",)),
    "inverted": ({"Yes": "stayed", "No": "churned"}, ("data.positive_label=stayed",)),
}


def test_labels_written_as_strings_or_numbers_prepare_the_same_data(churn_table, tmp_path, monkeypatch):
    """Each way of writing the labels prepares the same shards (every chunk's SHA-256) and fits the same
    preprocessing and class balance: all that training reads, so they train the same model (it was one training
    per way, 27 s; the other tests here train end to end)."""
    from ddl_apps.data.prepare import prepare
    from ddl_apps.trainers.tabular.trainer import PREPARER

    monkeypatch.setenv("DDL_CACHE", str(tmp_path / "cache"))
    read_by_training = {}
    for name, (mapping, overrides) in LABELS.items():
        csv = tmp_path / f"{name}.csv"
        churn_table.assign(Churn=churn_table["Churn"].map(mapping)).to_csv(csv, index=False)
        recipe = load_recipe(CHURN, [f"data.source={csv}", "data.positive_label=null", *overrides])
        manifest = json.loads((Path(prepare(recipe, PREPARER, str(tmp_path / name))) / "manifest.json").read_text())
        chunks = {split: [chunk["sha256"] for shard in shards for chunk in shard["chunks"]]
                  for split, shards in manifest["splits"].items()}
        fitted = {key: manifest["fitted"][key] for key in ("preprocessor", "train_positives")}
        read_by_training[name] = (chunks, fitted)
    for name in LABELS:
        assert read_by_training[name] == read_by_training["yes_no"], name


def edited(column: str, change):
    return lambda table: table.assign(**{column: change(table)})


BAD_INPUT = {
    "three label values": (edited("Churn", lambda t: t["Churn"].where(t.index % 50 > 0, "Maybe")), (),
                           "label column 'Churn' must hold two values for a binary classifier; it holds 3"),
    "positive label absent": (lambda t: t, ("data.positive_label=Churned",),
                              "data.positive_label 'Churned' does not occur in label column 'Churn'"),
    "two unknown label values": (edited("Churn", lambda t: t["Churn"].map({"Yes": "left", "No": "stayed"})),
                                 ("data.positive_label=null",),
                                 "label column 'Churn' holds 'left' and 'stayed': set data.positive_label"),
    "empty label": (edited("Churn", lambda t: t["Churn"].where(t.index != 7, "")), (),
                    "label column 'Churn' is empty in 1 rows (the first: row 7)"),
    "numbers mostly text": (edited("TotalCharges", lambda t: t["TotalCharges"].where(t.index % 3 > 0, "unknown")),
                            (), "numeric column 'TotalCharges' is mostly text ("),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gives_one_clear_error(case, churn_table, tmp_path):
    change, overrides, expected = BAD_INPUT[case]
    csv = tmp_path / "churn.csv"
    change(churn_table).to_csv(csv, index=False)
    result = ddl("train", CHURN, f"data.source={csv}", f"run.dir={tmp_path / 'run'}", *overrides)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_numbers_stored_as_text_are_parsed_and_the_choice_is_said():
    cells = pd.Series([" 29.85", "", "1,889.5", "108.15", "yes", "no", None, *["12"] * 100], dtype=object)
    values, note = data.column_numbers(cells, "TotalCharges", "t.csv")
    np.testing.assert_array_equal(values[:7], [29.85, np.nan, np.nan, 108.15, 1.0, 0.0, np.nan])
    assert note == ("column 'TotalCharges' holds numbers as text: read as numbers, 2 blank cells and 1 of other "
                    "text ('1,889.5') as missing values")
    flags, note = data.column_numbers(pd.Series([True, False]), "flag", "t.csv")
    assert flags.tolist() == [1.0, 0.0] and note is None
    with pytest.raises(DataError, match="column 'x' is mostly text"):
        data.column_numbers(pd.Series(["a", "b", "1"]), "x", "t.csv")


def test_label_coding_reads_two_values_case_blind():
    cfg = load_recipe(CHURN, ["data.positive_label=null"]).data
    coding = data.LabelCoding.of(pd.Series(["Yes", "no", "YES", "No"]), cfg)
    assert (coding.positive, coding.negative) == ("true", "false")
    assert data.LabelCoding.of(pd.Series([1.0, 0.0]), cfg).encode(pd.Series(["1", "0", 1]), cfg).tolist() == [1, 0, 1]
    yaml_yes = load_recipe(CHURN, ["data.positive_label=Yes"]).data  # YAML reads a bare Yes as true
    assert data.LabelCoding.of(pd.Series(["Yes", "No"]), yaml_yes).positive == "true"


def test_top_decile_counts_tied_scores_in_proportion():
    label = np.array([1, 1, 0, 0, 0, 1, 0, 0, 0, 0] * 2, dtype=float)  # 20 rows, 6 positives; top 10 % = 2 rows
    score = np.array([0.9, 0.5, 0.5, 0.5, 0.5] + [0.1] * 15)  # one sure row, then 1 of the 4 tied rows at 0.5
    assert captured(label, score, 0.1) == (pytest.approx((1 + 1 / 4) / 6), 0.1)
    figures = binary_metrics(label, score)
    assert figures["top_decile_lift"] == pytest.approx(figures["top_decile_capture"] / 0.1)
    assert figures["brier"] == pytest.approx(np.mean((score - label) ** 2))


def test_top_decile_lift_divides_by_the_share_of_rows_taken():
    """5 rows: the top tenth is 1 whole row, a fifth of them; holding 1 of the 2 positives, its lift is 0.5 / 0.2."""
    label, score = np.array([1.0, 0, 1, 0, 0]), np.array([0.9, 0.8, 0.3, 0.2, 0.1])
    assert binary_metrics(label, score)["top_decile_lift"] == pytest.approx(2.5)


@pytest.mark.parametrize("name", ["gradient_boosting", "logistic"])
@pytest.mark.parametrize("numeric,cardinalities", [(3, []), (0, [4, 6])], ids=["no categories", "no numbers"])
def test_every_baseline_fits_a_table_with_numbers_alone_or_categories_alone(name, numeric, cardinalities):
    """A table of numeric features only (data.categorical=[]) crashed the logistic baseline's one-hot step at the
    end of the run."""
    rng = np.random.default_rng(0)

    def rows(n):
        categories = np.stack([rng.integers(0, c, n) for c in cardinalities], axis=1) if cardinalities else \
            np.zeros((n, 0), np.int64)
        return {"numeric": rng.normal(size=(n, numeric)).astype(np.float32), "categories": categories,
                "label": rng.integers(0, 2, n).astype(np.float32)}

    pre = SimpleNamespace(num_features=numeric, cardinalities=cardinalities)
    scores = baseline_scores(name, rows(200), [rows(20), rows(30)], pre, seed=0)  # (the test rows in batches)
    assert scores.shape == (50,) and np.all((scores >= 0) & (scores <= 1))


@pytest.mark.parametrize("pre", [
    data.Preprocessor(["a", "b"], [0.0, 1.0], ["a"], [0.0, 1.0], [1.0, 2.0], {}, {}, 100),
    data.Preprocessor([], [], [], [], [], {"c": ["x", "y"]}, {"c": [60, 30]}, 100)], ids=["numbers", "categories"])
def test_a_table_of_numbers_alone_or_categories_alone_exports_to_onnx(pre, tmp_path):
    """Issue 38: the graph keeps both inputs (one of them with no columns), categories as text."""
    import onnxruntime

    model = TabularModel(pre.num_features, pre.cardinalities, [8], 4, 0.0)
    difference = onnx_graph.export(model, pre, {"id": None, "score": "score"}, tmp_path / "m.onnx")
    assert difference < 1e-6
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    assert [i.type for i in session.get_inputs()] == ["tensor(double)", "tensor(string)"]
    rows = {"numeric": np.ones((3, len(pre.numeric))), "categories": np.full((3, len(pre.vocabularies)), "y", object)}
    assert session.run(None, rows)[0].shape == (3,)


def test_a_recipe_naming_the_old_fraud_trainer_still_loads(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("trainer: fraud\ndata:\n  source: ieee-cis\n  label: isFraud\n")
    assert load_recipe(str(old)).trainer == "tabular"


def months(texts: list[str | None]) -> SimpleNamespace:
    """A table stand-in with a text time column, as split_rows reads it."""
    return SimpleNamespace(rows=len(texts), column=lambda name: pd.Series(texts, dtype=object))


def test_a_time_column_of_text_dates_splits_by_date_not_by_text():
    """24 monthly dates written MM/DD/YYYY sort as text with 12/2023 after 06/2024: the test split got
    11-12/2023 while training got 06-08/2024. Parsed as dates, the newest months are the test split."""
    dates = [f"{m:02d}/01/{y}" for y in (2023, 2024) for m in range(1, 13)]
    cfg = load_recipe(CHURN, ["data.time_column=month", "data.valid_fraction=0.125", "data.test_fraction=0.25"]).data
    assignment = data.split_rows(months(dates), np.zeros(24, np.float32), cfg, seed=0)
    assert [d for d, a in zip(dates, assignment, strict=True) if a == 2] == [f"{m:02d}/01/2024" for m in range(7, 13)]
    assert all(d.endswith("2023") or int(d[:2]) <= 3 for d, a in zip(dates, assignment, strict=True) if a == 0)


@pytest.mark.parametrize("cells,message", [
    (["01/01/2024", None, "03/01/2024"], "time column 'month' is empty in 1 rows (the first: row 1)"),
    (["2024-01-01", "soon", "2024-03-01"], "holds text that is not a date in the format of its first one"),
    (["01/13/2024", "13/01/2024", "01/14/2024"], "e.g. '13/01/2024' (row 1)"),
])
def test_a_time_column_that_is_no_date_is_one_clear_error(cells, message):
    cfg = load_recipe(CHURN, ["data.time_column=month"]).data
    with pytest.raises(DataError, match=re.escape(message)):
        data.split_rows(months(cells), np.zeros(len(cells), np.float32), cfg, seed=0)


def test_a_boolean_category_reads_alike_with_and_without_a_missing_cell():
    """A batch with a missing cell holds booleans as objects (True, None), one without as a bool column: both are
    the words true / false, so every batch finds them in the vocabulary (a bool batch became 1 / 0: category 0)."""
    with_missing = data.category_strings(pd.Series([True, None, False], dtype=object))
    without = data.category_strings(pd.Series([True, False]))
    assert with_missing.tolist()[::2] == without.tolist() == ["true", "false"] and pd.isna(with_missing[1])


def test_whether_a_numeric_column_is_text_is_decided_on_the_training_rows_only():
    """1 text cell in 13 (over the 5 % the training rows allowed) in a file to score, or in a preparation's last
    small batch, stopped it: the training rows decide, a batch follows (its text is a missing value)."""
    cfg = load_recipe(CHURN, []).data
    training = pd.DataFrame({"amount": [str(v) for v in range(100)], "card": ["a"] * 100})
    pre = data.Preprocessor.fit(training, ["amount"], ["card"], cfg)
    numeric, _ = pre.transform(pd.DataFrame({"amount": [*map(str, range(12)), "n/a"], "card": ["a"] * 13}))
    assert numeric.shape[0] == 13 and np.isfinite(numeric).all()
    with pytest.raises(DataError, match="is mostly text"):
        data.Preprocessor.fit(pd.DataFrame({"amount": ["1", "x", "y"], "card": ["a"] * 3}), ["amount"], ["card"], cfg)
