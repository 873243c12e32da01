"""Recommendation trainer: NeuMF on implicit feedback through the PyTorch engine, its embedding tables sharded
across workers (model parallel) or replicated; HR@k and NDCG@k of each held-out item among sampled negatives,
beside a most-popular baseline; `ddl recommend RUN_DIR USER_ID -k 10`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from ddl_apps.core.contract import Preparer, TorchTask, TrackedModel, TrainerHooks
from ddl_apps.core.dist import Topology
from ddl_apps.core.rundir import MODEL_DIR, reading_export
from ddl_apps.core.torch_engine import Batch, load_weights, save_weights
from ddl_apps.data.dataset import PreparedDataset, task_splits
from ddl_apps.data.prepare import open_prepared
from ddl_apps.errors import DataError
from ddl_apps.recipe import Recipe
from ddl_apps.trainers.recsys import data, onnx_graph
from ddl_apps.trainers.recsys.model import CandidateScorer, NeuMF

ARCHITECTURE = "model.json"


def held_out_rank(scores: np.ndarray | torch.Tensor):
    """Rank (0 = top) of column 0 among each row's candidates; ties count against it."""
    return (scores[:, 1:] >= scores[:, :1]).sum(1)


def ranking_metrics(rank: np.ndarray, k: int) -> dict[str, float]:
    """HR@k (share of held-out items ranked in the top k) and NDCG@k (1 / log2(rank + 2) when in it)."""
    hit = rank < k
    return {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(np.where(hit, 1 / np.log2(rank + 2), 0.0).mean())}


def to_torch(columns: dict[str, np.ndarray]) -> Batch:
    return {name: torch.from_numpy(values) for name, values in columns.items()}


class RecommendTask(TorchTask):
    def __init__(self, recipe: Recipe, dataset: PreparedDataset, topology: Topology):
        cfg, self.model_cfg, self.dataset = recipe.data, recipe.model, dataset
        self.top_k, self.seed, self.negatives = cfg.top_k, recipe.run.seed, cfg.train_negatives
        self.num_users, self.num_items = dataset.manifest.fitted["num_users"], dataset.manifest.fitted["num_items"]
        self.shard = (topology.rank, topology.size) if self.model_cfg.model_parallel and topology.size > 1 else None
        self.seen = data.SeenItems(np.load(dataset.file(data.SEEN), mmap_mode="r"), self.num_items)
        self.train, self.valid, self.test = task_splits(dataset, cfg, self.seed, to_torch, augment=self.with_negatives)

    def with_negatives(self, columns: dict[str, np.ndarray], rows: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        """Each training interaction beside `train_negatives` items its user has not trained on (column 0 of
        `items` is the seen one, `label` says so)."""
        users = columns["user"]
        negatives = data.sampled_negatives(users, rows, epoch, self.seed, self.negatives, self.seen)
        labels = np.zeros((len(users), 1 + self.negatives), dtype=np.float32)
        labels[:, 0] = 1.0
        return {"user": users, "items": np.hstack([columns["item"][:, None], negatives]), "label": labels}

    def architecture(self) -> dict:
        m = self.model_cfg
        return {"num_users": self.num_users, "num_items": self.num_items,
                "gmf_dim": m.gmf_dim, "mlp_dim": m.mlp_dim, "mlp_layers": m.mlp_layers, "init_std": m.init_std}

    def build_model(self) -> NeuMF:
        return NeuMF(**self.architecture(), seed=self.seed, shard=self.shard)

    def loss(self, model: NeuMF, batch: Batch) -> torch.Tensor:
        logits = model(batch["user"], batch["items"])
        if self.model_cfg.loss == "bpr":  # column 0 holds the seen item, the others the sampled unseen ones
            return -torch.nn.functional.logsigmoid(logits[:, :1] - logits[:, 1:]).mean()
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])

    def predict(self, model: NeuMF, batch: Batch) -> dict[str, torch.Tensor]:
        return {"rank": held_out_rank(model(batch["user"], batch["items"])), "user": batch["user"]}

    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        return ranking_metrics(outputs["rank"], self.top_k)

    def export(self, model: torch.nn.Module, model_dir: Path) -> None:
        """Weights (whole tables), the architecture, the id and title of every user and item, and each user's
        interactions (so `ddl recommend` leaves out what a user has already seen)."""
        save_weights(model, model_dir)
        (model_dir / ARCHITECTURE).write_text(json.dumps(self.architecture()))
        for name in (data.CATALOGUE, data.HISTORY):
            shutil.copyfile(self.dataset.file(name), model_dir / name)

    def tracked_model(self, model: NeuMF, batch: Batch) -> TrackedModel:
        """Each test row as the user's index, then its candidates' (the held-out item first)."""
        rows = torch.cat([batch["user"][:, None], batch["items"]], 1).numpy()
        return TrackedModel("pytorch", CandidateScorer(model).eval(), rows)

    def report(self) -> dict[str, dict[str, float]]:
        """Most popular first (training interactions per item), ranked over the same test candidates."""
        if not self.model_cfg.baseline:
            return {}
        candidates = self.dataset.split("test").load(columns=["items"])["items"]
        popularity = np.load(self.dataset.file(data.POPULARITY))
        rank = held_out_rank(popularity[candidates].astype(np.float64))
        return {"baseline most-popular (test)": ranking_metrics(rank, self.top_k)}


PREPARER = Preparer(source=data.source_identity, write=data.write_prepared, columns=data.COLUMNS)


def build_task(recipe: Recipe, topology: Topology) -> RecommendTask:
    """The interactions, split and indexed once into a prepared dataset that every worker streams."""
    return RecommendTask(recipe, open_prepared(recipe, PREPARER), topology)


def load_exported(model_dir: Path) -> tuple[NeuMF, dict, data.SeenItems]:
    with reading_export(model_dir), np.load(model_dir / data.HISTORY, allow_pickle=False) as history:
        architecture = json.loads((model_dir / ARCHITECTURE).read_text())
        catalogue = json.loads((model_dir / data.CATALOGUE).read_text())
        seen = data.SeenItems.of(history["users"], history["items"], architecture["num_items"])
    model = NeuMF(**architecture, seed=0)
    load_weights(model, model_dir)
    return model.eval(), catalogue, seen


@torch.no_grad()
def recommend(model_dir: Path, user_id: str, k: int) -> list[dict]:
    """The k items the model scores highest for a user, leaving out those the user has interacted with."""
    model, catalogue, seen = load_exported(model_dir)
    users = catalogue["users"]
    try:
        user = users.index(user_id)
    except ValueError:
        raise DataError(f"unknown user {user_id!r}; the run knows {len(users)} users, e.g. "
                        f"{', '.join(users[:5])}") from None
    items = np.arange(len(catalogue["items"]))
    scores = torch.sigmoid(model(torch.tensor([user]), torch.from_numpy(items)[None]))[0].numpy()
    scores[seen.contains(np.full_like(items, user), items)] = -np.inf
    best = np.argsort(-scores, kind="stable")[:k]
    best = best[np.isfinite(scores[best])]
    return [{"rank": r + 1, "item": catalogue["items"][i], "score": float(scores[i]),
             "title": catalogue["titles"].get(catalogue["items"][i], "")} for r, i in enumerate(best)]


def recommend_cli(run_dir: Path, user_id: str, k: int) -> None:
    """`ddl recommend RUN_DIR USER_ID -k 10`: rank, item id, score and title, one line each."""
    for row in recommend(run_dir / MODEL_DIR, user_id, k):
        print(f"{row['rank']}\t{row['item']}\t{row['score']:.4f}\t{row['title']}")


def predict_cli(run_dir: Path, inputs: list[str], output: Path | None) -> None:
    """`ddl predict RUN_DIR USER_ID`: the top 10 for one user (`ddl recommend` chooses k)."""
    if len(inputs) != 1 or output is not None:
        raise DataError("a recommendation run predicts for one user at a time: ddl recommend RUN_DIR USER_ID -k 10")
    recommend_cli(run_dir, inputs[0], 10)


def export_onnx(model_dir: Path, output: Path) -> float:
    return onnx_graph.export(*load_exported(model_dir), output)


HOOKS = TrainerHooks(build_task=build_task, predict=predict_cli, recommend=recommend_cli, prepare=PREPARER,
                     export_onnx=export_onnx)
