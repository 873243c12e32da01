"""Issue 9: the recommender: the leave-one-out split, sampled negatives, ranking metrics, sharded against
replicated embedding tables at np=2, a training run and `ddl recommend`."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ddl_apps.core.dist import Topology
from ddl_apps.errors import DataError
from ddl_apps.recipe import load_recipe
from ddl_apps.trainers.recsys import data
from ddl_apps.trainers.recsys.trainer import build_task, held_out_rank, load_exported, ranking_metrics
from tests.engine_runs import ddl, final_weights, launch_worker, summary
from tests.engine_runs import train as train_recipe
from tests.mlflow_server import logged_model
from tests.trainers.onnx_checks import exported, largest_difference

RECIPE = "recsys_neumf"
ONE_WORKER = Topology(rank=0, size=1, local_rank=0, local_size=1)
ONE_EPOCH = ("optim.epochs=1", "optim.batch_size=1024", "run.log_every=8")  # 47 steps at np=2


def train(run_dir, *overrides: str, np: int = 1, flags: tuple[str, ...] = ()):
    return train_recipe(run_dir, *overrides, np=np, recipe=RECIPE, flags=flags)


def data_config(*overrides: str):
    return load_recipe(RECIPE, list(overrides)).data


def write_interactions(path, rows: list[tuple]) -> str:
    pd.DataFrame(rows, columns=["user", "item", "timestamp"]).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def movielens_task():
    return build_task(load_recipe(RECIPE), ONE_WORKER)


# ---- metrics and data --------------------------------------------------------------------------------------
def test_ranking_metrics_on_a_hand_made_ranking():
    scores = np.array([[0.9, 0.1, 0.2, 0.3],   # held-out item first: rank 0
                       [0.2, 0.5, 0.1, 0.9],   # two above it: rank 2
                       [0.1, 0.5, 0.6, 0.7],   # last: rank 3
                       [0.5, 0.5, 0.1, 0.1]])  # a tie counts against it: rank 1
    rank = held_out_rank(scores)
    assert rank.tolist() == [0, 2, 3, 1]
    metrics = ranking_metrics(rank, k=2)
    assert metrics["hr@2"] == 0.5
    assert metrics["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert ranking_metrics(rank, k=4) == {"hr@4": 1.0, "ndcg@4": pytest.approx(
        (1 + 1 / math.log2(4) + 1 / math.log2(5) + 1 / math.log2(3)) / 4)}


@pytest.fixture
def small_history(tmp_path):
    source = write_interactions(tmp_path / "own.csv", [
        ("a", "x", 5), ("a", "y", 1), ("a", "z", 3), ("a", "w", 9),   # by time: y z x w
        ("b", "x", 1), ("b", "y", 2),                                 # too short to evaluate: all train
        ("c", "x", 1), ("c", "y", 2), ("c", "x", 4), ("c", "z", 3),   # x twice: kept at its first time
    ])
    interactions = data.load_interactions(data_config(f"data.source={source}"))

    def pairs(rows):
        return {(interactions.user_ids[u], interactions.item_ids[i])
                for u, i in zip(interactions.users[rows], interactions.items[rows], strict=True)}

    return interactions, pairs


def test_leave_one_out_holds_out_the_last_by_time_and_the_one_before(small_history):
    interactions, pairs = small_history
    split = data.leave_one_out(interactions, "previous", seed=0)
    assert pairs(split.test) == {("a", "w"), ("c", "z")}
    assert pairs(split.valid) == {("a", "x"), ("c", "y")}
    assert pairs(split.train) == {("a", "y"), ("a", "z"), ("b", "x"), ("b", "y"), ("c", "x")}
    assert len(interactions.users) == 9


def test_random_validation_item_is_one_earlier_interaction_per_user(small_history):
    interactions, pairs = small_history
    drawn = set()
    for seed in range(20):
        split = data.leave_one_out(interactions, "random", seed)
        assert pairs(split.test) == {("a", "w"), ("c", "z")}
        valid = pairs(split.valid)
        assert {user for user, _ in valid} == {"a", "c"} and len(valid) == 2
        assert valid <= {("a", "x"), ("a", "y"), ("a", "z"), ("c", "x"), ("c", "y")}
        assert pairs(split.train) | valid | pairs(split.test) == pairs(np.arange(9)) and len(split.train) == 5
        drawn |= valid
    assert len(drawn) == 5  # every earlier interaction gets drawn for some seed
    assert np.array_equal(data.leave_one_out(interactions, "random", 3).valid,
                          data.leave_one_out(interactions, "random", 3).valid)


def test_movielens_100k_is_read_from_recbole(movielens_task):
    interactions = data.load_interactions(data_config())
    assert (interactions.num_users, interactions.num_items, len(interactions.users)) == (943, 1682, 100_000)
    assert interactions.titles["1"] == "Toy Story (1995)"
    assert len(movielens_task.valid) == len(movielens_task.test) == 943  # every user rated 20 films or more
    assert movielens_task.train.examples == 100_000 - 2 * 943


def test_evaluation_candidates_are_the_held_out_item_and_distinct_unseen_ones(movielens_task):
    interactions = data.load_interactions(data_config())
    seen = data.SeenItems.of(interactions.users, interactions.items, interactions.num_items)
    held_out = {name: movielens_task.dataset.split(name).load() for name in ("valid", "test")}
    for split in held_out.values():
        users, items = split["user"], split["items"]
        assert items.shape == (943, 100)
        assert seen.contains(users, items[:, 0]).all()
        assert not seen.contains(users[:, None], items[:, 1:]).any()
        assert all(len(set(row)) == 100 for row in items)
    assert not np.array_equal(held_out["valid"]["items"][:, 1:], held_out["test"]["items"][:, 1:])


def test_training_negatives_are_unseen_and_drawn_alike_at_any_number_of_workers(movielens_task):
    """A global step of 5,000: items the users have not trained on, the same on one worker as on three, and
    new ones in another epoch."""
    def step(epoch: int, rank: int, size: int) -> dict:
        return next(iter(movielens_task.train.rank_steps(epoch, 0, 5000, rank, size, 1)))[0]

    batch = step(0, 0, 1)
    users, items = batch["user"].numpy(), batch["items"].numpy()
    assert items.shape == (5000, 5) and batch["label"][:, 0].eq(1).all() and batch["label"][:, 1:].eq(0).all()
    assert movielens_task.seen.contains(users, items[:, 0]).all()
    assert not movielens_task.seen.contains(users[:, None], items[:, 1:]).any()
    shares = np.concatenate([step(0, rank, 3)["items"].numpy() for rank in range(3)])
    np.testing.assert_array_equal(shares, items)
    assert (step(1, 0, 1)["items"].numpy()[:, 1:] != items[:, 1:]).mean() > 0.9


def test_the_workers_share_one_memory_mapped_index_of_seen_pairs(movielens_task):
    assert isinstance(movielens_task.seen.keys, np.memmap)
    assert len(movielens_task.seen.keys) == 100_000 - 2 * 943


def test_distinct_unseen_sampling_finishes_users_with_few_unseen_items():
    users, items = np.repeat([0, 1], [5, 2]), np.array([0, 1, 2, 3, 4, 0, 1])
    drawn = data.unseen_distinct(np.array([0, 1]), 3, data.SeenItems.of(users, items, 8), seed=0)
    assert sorted(drawn[0]) == [5, 6, 7]  # user 0 has exactly three unseen items
    assert len(set(drawn[1])) == 3 and not set(drawn[1]) & {0, 1}
    with pytest.raises(DataError, match="eval_negatives"):
        data.unseen_distinct(np.array([0]), 4, data.SeenItems.of(users, items, 8), seed=0)


# ---- bad input ----------------------------------------------------------------------------------------------
def test_missing_column_names_the_columns_and_the_setting(tmp_path):
    source = tmp_path / "own.csv"
    pd.DataFrame({"user": ["a"], "item": ["x"], "time": [1]}).to_csv(source, index=False)
    result = ddl("train", RECIPE, f"data.source={source}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "no column 'timestamp'" in result.stderr and "data.time_column" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_timestamp_that_is_not_a_number_is_named(tmp_path):
    source = write_interactions(tmp_path / "own.csv", [("a", "x", 1), ("a", "y", "yesterday")])
    with pytest.raises(DataError, match="row 3 has timestamp 'yesterday'"):
        data.load_interactions(data_config(f"data.source={source}"))


# ---- training -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_worker_run(tmp_path_factory, mlflow_uri):
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        return train(tmp_path_factory.mktemp("one") / "run", *ONE_EPOCH)


def test_the_tracked_model_ranks_the_held_out_items_as_the_evaluation_did(one_worker_run, mlflow_uri):
    """MLflow's pytorch flavour (torch.export's graph) on its input example, the first test rows."""
    model, inputs = logged_model(mlflow_uri, one_worker_run)
    rows = model.input_example
    assert inputs.is_tensor_spec() and inputs.inputs[0].shape == (-1, rows.shape[1])
    ranks = held_out_rank(np.asarray(model.predict(rows)))
    assert ranks.tolist() == np.load(one_worker_run / "test_outputs.npz")["rank"][: len(rows)].tolist()


def test_one_worker_learns_and_recommends_unseen_films(one_worker_run):
    run = one_worker_run
    results = summary(run)["results"]
    model, baseline = results["model (test)"], results["baseline most-popular (test)"]
    assert model["hr@10"] > 0.3 and baseline["hr@10"] > 0.3  # chance is 0.1

    listed = ddl("recommend", str(run), "1", "-k", "5")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.strip().splitlines()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]
    scores = [float(r[2]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(r[3] for r in rows)  # titles known
    catalogue = json.loads((run / "model" / "catalogue.json").read_text())
    interactions = data.load_interactions(data_config())
    user = catalogue["users"].index("1")
    rated = {interactions.item_ids[i] for i in interactions.items[interactions.users == user]}
    assert not {r[1] for r in rows} & rated

    unknown = ddl("recommend", str(run), "no-such-user")
    assert unknown.returncode == 2 and "unknown user 'no-such-user'" in unknown.stderr


def test_onnx_export_ranks_the_test_candidates_as_pytorch_did(one_worker_run, movielens_task, tmp_path):
    """Issue 38: user and candidate items in, probabilities out; ids, titles and each user's seen items in the
    file's metadata."""
    session, metadata = exported(one_worker_run, tmp_path / "recommend.onnx")
    catalogue = json.loads((one_worker_run / "model" / "catalogue.json").read_text())
    assert metadata["users"] == catalogue["users"] and metadata["items"] == catalogue["items"]
    assert len(metadata["seen_items"]) == len(catalogue["users"])
    test = movielens_task.test.take(np.arange(len(movielens_task.test)))  # every user's held-out item first
    inputs = {"user": test["user"].numpy(), "items": test["items"].numpy()}  # 943 x 100 (the example: 4 x 6)
    [probability] = session.run(None, inputs)
    model = load_exported(one_worker_run / "model")[0]
    with torch.no_grad():
        expected = torch.sigmoid(model(test["user"], test["items"])).numpy()
    assert largest_difference(probability, expected) < 1e-6  # measured: 1.0e-07
    evaluated = np.load(one_worker_run / "test_outputs.npz")  # PyTorch's ranks, in the final evaluation
    assert np.mean(held_out_rank(probability) == evaluated["rank"]) > 0.99  # (near-ties may flip)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("sharded") / "run", *ONE_EPOCH, "model.model_parallel=true", np=2)


@pytest.mark.distributed
def test_sharded_table_looks_up_and_learns_as_a_replicated_one():
    output = launch_worker("sharded_embedding.py", "gloo")
    assert all(f"sharded embedding ok on rank {r} of 2" in output for r in range(2))


@pytest.mark.distributed
def test_sharded_and_replicated_training_match_at_two_workers(sharded_run, tmp_path):
    replicated = train(tmp_path / "replicated", *ONE_EPOCH, "model.model_parallel=false", np=2)

    def losses(run):
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [line["loss"] for line in lines if line["split"] == "train"]

    assert len(losses(sharded_run)) == 5
    np.testing.assert_allclose(losses(sharded_run), losses(replicated), rtol=1e-5)
    np.testing.assert_allclose(final_weights(sharded_run), final_weights(replicated), rtol=0, atol=1e-5)

    tables = (943 + 1682) * 64 * 4  # float32 user and item tables
    memory = summary(sharded_run)["parameter_bytes_by_rank"]
    assert [m["sharded"] for m in memory] == pytest.approx([tables / 2] * 2, rel=0.01)
    assert [m["sharded"] for m in summary(replicated)["parameter_bytes_by_rank"]] == [0, 0]
    digests = summary(sharded_run)["weights_sha256_by_rank"]
    assert digests[0] == digests[1]


@pytest.mark.distributed
def test_sharded_run_resumes_to_the_uninterrupted_weights(sharded_run, tmp_path):
    """The checkpoint holds whole tables and whole Adam moments; each rank takes its rows back on resume."""
    run = tmp_path / "run"
    train(run, *ONE_EPOCH, "model.model_parallel=true", "run.max_steps=20", np=2)
    assert not (run / "model").exists()
    train(run, *ONE_EPOCH, "model.model_parallel=true", np=2, flags=("--resume",))
    np.testing.assert_allclose(final_weights(run), final_weights(sharded_run), rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss", ["bce", "bpr"])
def test_losses_on_known_scores(movielens_task, loss, monkeypatch):
    import torch

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    batch = {"user": torch.tensor([0, 1]), "items": torch.zeros(2, 3, dtype=torch.long),
             "label": torch.tensor([[1.0, 0, 0], [1.0, 0, 0]])}
    monkeypatch.setattr(movielens_task, "model_cfg", movielens_task.model_cfg.model_copy(update={"loss": loss}))
    value = float(movielens_task.loss(lambda user, items: logits, batch))
    sigmoid = torch.sigmoid
    expected = (-torch.log(sigmoid(logits[:, :1] - logits[:, 1:])).mean() if loss == "bpr" else
                -(torch.log(sigmoid(logits[:, 0])).sum() + torch.log(1 - sigmoid(logits[:, 1:])).sum()) / 6)
    assert value == pytest.approx(float(expected), rel=1e-6)
