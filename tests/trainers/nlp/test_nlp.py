"""Issue 8: the text classifier: data loading and its errors, labels, tokenised batches, a training run, and
predictions from the exported model."""

import json

import numpy as np
import pandas as pd
import pytest

from ddl_apps.errors import CheckpointError, DataError, RecipeError
from ddl_apps.recipe import load_recipe
from ddl_apps.trainers import splits
from ddl_apps.trainers.nlp import data, model
from ddl_apps.trainers.nlp.trainer import build_task, classification_metrics
from tests.engine_runs import ddl, summary, train
from tests.mlflow_server import logged_model
from tests.trainers.onnx_checks import exported, largest_difference

RECIPE = "nlp_minilm"
TINY_MODEL = ("model.pretrained=false", "model.num_hidden_layers=1", "model.hidden_size=32",
              "model.num_attention_heads=2", "model.intermediate_size=64")
SLICE = ("data.rows=120", "optim.batch_size=8", "optim.epochs=1", "optim.warmup_steps=2", "run.log_every=4")


def data_config(*overrides: str):
    return load_recipe(RECIPE, list(overrides)).data


def write_csv(path, rows: dict) -> str:
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


# ---- reading and checking data ---------------------------------------------------------------------------------
def test_default_corpus_is_fresh_vs_rotten_without_plots():
    splits = data.load_splits(data_config())
    assert splits.label_names == ["fresh", "rotten"]
    sizes = [len(s.texts) for s in (splits.train, splits.valid, splits.test)]
    assert sum(sizes) == 12752  # 12,808 fresh / rotten snippets less 56 repeated ones
    assert sizes[1] == sizes[2] == pytest.approx(1275, abs=2)
    rotten_share = [s.labels.mean() for s in (splits.train, splits.valid, splits.test)]
    assert max(rotten_share) - min(rotten_share) < 0.01  # stratified
    assert not set(splits.train.texts) & set(splits.test.texts) and not set(splits.valid.texts) & set(splits.test.texts)


def test_split_is_reproducible_and_follows_split_seed():
    first, again = (data.load_splits(data_config("data.rows=500")) for _ in range(2))
    assert first.test.texts == again.test.texts and first.train.texts == again.train.texts
    other = data.load_splits(data_config("data.rows=500", "data.split_seed=1"))
    assert other.test.texts != first.test.texts


def test_stratified_split_keeps_every_row_once_and_label_shares():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    test, valid, train = splits.stratified_split(labels, [0.1, 0.2], seed=3)
    assert sorted(np.concatenate([test, valid, train]).tolist()) == list(range(1000))
    assert np.bincount(labels[test]).tolist() == [60, 30, 10] and np.bincount(labels[valid]).tolist() == [120, 60, 20]


def test_bring_your_own_labels_sorted_by_name_and_stored_in_the_model_config(tmp_path):
    texts = [f"review number {i} says {'great' if i % 3 else 'bad'}" for i in range(60)]
    source = write_csv(tmp_path / "own.csv", {"review": texts, "stars": ["pos", "neg", "mixed"] * 20})
    recipe = load_recipe(RECIPE, [f"data.source={source}", "data.text_column=review", "data.label_column=stars",
                                  *TINY_MODEL])
    task = build_task(recipe, None)
    assert task.label_names == ["mixed", "neg", "pos"]
    assert task.config.id2label == {0: "mixed", 1: "neg", 2: "pos"} and task.config.label2id["pos"] == 2
    train = task.dataset.split("train").load()
    names = [task.label_names[i] for i in train["label"]]
    frame = pd.read_csv(source).set_index("review")
    assert names == frame.loc[list(train["text"]), "stars"].tolist()


def test_whole_number_labels_keep_numeric_order():
    assert sorted(["10", "2", "1", "b", "a"], key=data.label_order) == ["1", "2", "10", "a", "b"]


def test_json_lines_source(tmp_path):
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i}", "label": i % 2}) + "\n" for i in range(40)))
    splits = data.load_splits(data_config(f"data.source={path}"))
    assert splits.label_names == ["0", "1"] and len(splits.train.texts) == 32


def test_missing_column_lists_the_columns_there_are(tmp_path):
    source = write_csv(tmp_path / "own.csv", {"review": ["good"] * 4, "sentiment": ["pos"] * 4})
    with pytest.raises(DataError) as error:
        data.load_splits(data_config(f"data.source={source}", "data.label_column=sentiment"))
    message = str(error.value)
    assert "no column 'text'" in message and "'review', 'sentiment'" in message and "data.text_column" in message


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_empty_texts_and_missing_labels_are_named_by_row(tmp_path, suffix):
    frame = pd.DataFrame({"text": ["fine", "", "ok", "sure"], "label": ["a", "b", None, "a"]})
    path = tmp_path / f"own{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_json(path, orient="records", lines=True)
    with pytest.raises(DataError, match=r"1 row\(s\) have an empty 'text' \(rows 2,"):
        data.load_splits(data_config(f"data.source={path}"))
    frame.loc[1, "text"] = "now filled"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_json(path, orient="records", lines=True)
    with pytest.raises(DataError, match=r"empty 'label' \(rows 3,"):
        data.load_splits(data_config(f"data.source={path}"))


def test_unknown_paths_and_formats_are_named(tmp_path):
    with pytest.raises(DataError, match="no_such.csv does not exist"):
        data.load_splits(data_config(f"data.source={tmp_path / 'no_such.csv'}"))
    (tmp_path / "texts.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"texts.xlsx.*\.csv, \.tsv or \.jsonl"):
        data.load_splits(data_config(f"data.source={tmp_path / 'texts.xlsx'}"))
    with pytest.raises(CheckpointError, match="no_model does not exist"):
        model.model_folder(str(tmp_path / "no_model"))
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(CheckpointError, match="empty_model has no config.json"):
        model.model_folder(str(tmp_path / "empty_model"))


def test_one_label_only_is_refused(tmp_path):
    source = write_csv(tmp_path / "own.csv", {"text": [f"t{i}" for i in range(10)], "label": ["x"] * 10})
    with pytest.raises(DataError, match="only the label"):
        data.load_splits(data_config(f"data.source={source}"))


def test_bad_model_settings_fail_before_training():
    with pytest.raises(RecipeError, match="pretrained=false"):
        load_recipe(RECIPE, ["model.hidden_size=32"])
    recipe = load_recipe(RECIPE, ["data.rows=60", "model.pretrained=false", "model.hidden_size=30",
                                  "model.num_attention_heads=4"])
    with pytest.raises(RecipeError, match="multiple of model.num_attention_heads"):
        build_task(recipe, None)
    with pytest.raises(RecipeError, match="512 positions"):
        build_task(load_recipe(RECIPE, ["data.rows=60", "data.max_length=1024"]), None)


def test_bad_data_exits_2_and_writes_nothing(tmp_path):
    result = ddl("train", RECIPE, f"data.source={tmp_path / 'missing.csv'}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "missing.csv" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# ---- tokenised batches ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return model.load_tokenizer(model.minilm_dir(), max_length=12)


def test_lengths_count_tokens_and_batches_pad_to_their_longest(tokenizer):
    split = data.Split(["Great.", "A long, winding and utterly forgettable film about nothing at all, really.",
                        "Not bad"], np.array([0, 1, 0]))
    columns = data.tokenised(split, tokenizer, max_length=12)
    assert columns["length"].tolist() == [4, 12, 4]  # [CLS] great . [SEP]; truncated; [CLS] not bad [SEP]
    assert columns["input_ids"].shape == (3, 12) and columns["text"][1] == split.texts[1]

    def rows(*picked):
        return data.to_batch({k: v[list(picked)] for k, v in columns.items()})

    batch = rows(2, 0)
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"].sum().item() == 8
    assert batch["label"].tolist() == [0, 0] and batch["index"].tolist() == [2, 0]
    wide = rows(0, 1)
    assert wide["input_ids"].shape == (2, 12) and wide["input_ids"][0, 4:].eq(tokenizer.pad_token_id).all()
    assert wide["attention_mask"][0].tolist() == [1] * 4 + [0] * 8


def test_bucketing_by_token_length_cuts_padding_and_evaluation_reads_shortest_first():
    """An epoch of the streamed training split (global batch 32) pads to fewer tokens with the steps bucketed by
    length than without; the evaluation splits are prepared shortest first."""
    task = build_task(load_recipe(RECIPE, ["data.rows=3000", *TINY_MODEL]), None)

    def padded_tokens() -> int:
        return sum(b["input_ids"].numel() for step in task.train.rank_steps(0, 0, 32, 0, 1, 1) for b in step)

    bucketed = padded_tokens()
    task.train.bucket_by = None
    assert bucketed < 0.7 * padded_tokens()
    lengths = task.dataset.split("test").load()["length"]
    assert np.all(np.diff(lengths) >= 0)


def test_metrics_on_known_predictions():
    label, predicted = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 1, 0])
    metrics = classification_metrics(label, predicted)
    f1 = [2 * 2 / (2 * 2 + 1 + 1), 2 * 2 / (2 * 2 + 1), 0.0]  # 2TP/(2TP+FP+FN) per label
    assert metrics == pytest.approx({"accuracy": 4 / 6, "macro_f1": np.mean(f1)})


# ---- a training run and its export ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mlflow_uri):
    """The shipped recipe on a 120-snippet slice, with a 1-layer randomly initialised model, in one process, tracked
    in MLflow."""
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        return train(tmp_path_factory.mktemp("nlp") / "run", *SLICE, *TINY_MODEL, recipe=RECIPE)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_single_process_smoke_run_writes_model_metrics_and_predictions(tiny_run):
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "summary.json", "test_outputs.npz",
                 "test_predictions.jsonl", "model/model.safetensors", "model/config.json", "model/tokenizer.json"):
        assert (tiny_run / name).is_file(), name
    result = summary(tiny_run)
    for row in ("model (test)", "baseline TF-IDF LR (test)"):
        assert 0 <= result["results"][row]["accuracy"] <= 1 and 0 <= result["results"][row]["macro_f1"] <= 1
    assert result["steps"] == 96 // 8
    config = json.loads((tiny_run / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "fresh", "1": "rotten"} and config["num_hidden_layers"] == 1
    assert json.loads((tiny_run / "model" / "tokenizer_config.json").read_text())["model_max_length"] == 128
    predictions = read_jsonl(tiny_run / "test_predictions.jsonl")
    assert len(predictions) == 12 and {p["label"] for p in predictions} == {"fresh", "rotten"}
    accuracy = np.mean([p["label"] == p["predicted"] for p in predictions])
    assert accuracy == pytest.approx(result["results"]["model (test)"]["accuracy"])


def test_predictions_from_the_reloaded_export_equal_those_recorded_before_export(tiny_run, tmp_path):
    recorded = read_jsonl(tiny_run / "test_predictions.jsonl")
    printed = ddl("predict", str(tiny_run), "-o", str(tmp_path / "out.jsonl"), "--", *(r["text"] for r in recorded))
    assert printed.returncode == 0, printed.stderr
    reloaded = read_jsonl(tmp_path / "out.jsonl")
    assert [r["text"] for r in reloaded] == [r["text"] for r in recorded]
    for before, after in zip(recorded, reloaded, strict=True):
        # other batches pad differently, which moves probabilities by float rounding only
        assert after["probabilities"] == pytest.approx(before["probabilities"], abs=1e-5)
        if abs(before["probabilities"]["fresh"] - before["probabilities"]["rotten"]) > 1e-4:
            assert after["predicted"] == before["predicted"]
    lines = [line.split("\t") for line in printed.stdout.splitlines()]
    assert [(label, text) for label, _, text in lines] == [(r["predicted"], r["text"]) for r in reloaded]
    assert all(0.5 <= float(probability) <= 1 for _, probability, _ in lines)
    evaluated = json.loads(ddl("eval", str(tiny_run)).stdout)
    assert evaluated == pytest.approx(summary(tiny_run)["results"]["model (test)"])


def test_onnx_export_with_its_tokenizer_gives_the_recorded_test_probabilities(tiny_run, tmp_path):
    """Issue 38: the graph takes token ids and mask [batch, sequence]; the file's metadata carries the tokenizer
    (read by `tokenizers` alone), and the probabilities come out as the run recorded them."""
    from tokenizers import Tokenizer

    session, metadata = exported(tiny_run, tmp_path / "text.onnx")
    tokenizer = Tokenizer.from_str(json.dumps(metadata["tokenizer"]))  # (truncation and padding included)
    recorded = read_jsonl(tiny_run / "test_predictions.jsonl")
    encoded = tokenizer.encode_batch([r["text"] for r in recorded])
    inputs = {"input_ids": np.array([e.ids for e in encoded]), "attention_mask": np.array([e.attention_mask
                                                                                           for e in encoded])}
    assert inputs["input_ids"].shape[0] == 12  # (the export's example: 2 texts, of another length)
    [probabilities] = session.run(None, inputs)
    expected = np.array([[r["probabilities"][name] for name in metadata["labels"]] for r in recorded])
    assert largest_difference(probabilities, expected) < 1e-5  # measured: 0 (3e-08 on another batch)


def test_the_tracked_transformers_pipeline_predicts_as_the_run_did(tiny_run, mlflow_uri):
    """Issue 38: the text-classification pipeline (model and tokenizer) logged in MLflow labels its input example,
    test texts, as the run's own predictions did."""
    logged, _ = logged_model(mlflow_uri, tiny_run)
    texts = logged.input_example
    predicted = logged.predict(texts)  # (a DataFrame: label, score)
    recorded = {r["text"]: r for r in read_jsonl(tiny_run / "test_predictions.jsonl")}
    assert len(texts) == 5 and predicted["label"].tolist() == [recorded[text]["predicted"] for text in texts]
    np.testing.assert_allclose(predicted["score"], [recorded[text]["probability"] for text in texts], atol=1e-5)


def test_predict_refuses_empty_texts_and_missing_models(tiny_run, tmp_path):
    result = ddl("predict", str(tiny_run), "fine film", "  ")
    assert result.returncode == 2 and "text number 2 is empty" in result.stderr
    with pytest.raises(CheckpointError, match="did the run finish"):
        model.load_exported(tmp_path)


# Slow because it must: the pretrained 22.7 M-parameter MiniLM has to learn past chance on two workers.
@pytest.mark.distributed
def test_two_workers_fine_tune_identically_and_beat_chance(tmp_path):
    """The pretrained MiniLM on a 2,000-snippet slice at np=2: the ranks end with identical weights, and the test
    accuracy beats always answering the commoner label (one epoch, 50 steps: 0.695 against 0.58)."""
    run = train(tmp_path / "run", "data.rows=2000", "optim.batch_size=16", "optim.epochs=1", "optim.warmup_steps=10",
                "run.log_every=10", np=2, recipe=RECIPE)
    result = summary(run)
    assert len(result["weights_sha256_by_rank"]) == 2 and len(set(result["weights_sha256_by_rank"])) == 1
    labels = [p["label"] for p in read_jsonl(run / "test_predictions.jsonl")]
    majority = max(labels.count(name) for name in set(labels)) / len(labels)
    assert result["results"]["model (test)"]["accuracy"] > majority + 0.05
    printed = ddl("predict", str(run), "A dazzling, moving triumph.", "A dull, lifeless mess.")
    assert printed.returncode == 0, printed.stderr
    assert [line.split("\t")[0] in ("fresh", "rotten") for line in printed.stdout.splitlines()] == [True, True]
