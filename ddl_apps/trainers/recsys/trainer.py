"""Recommendation trainer: NeuMF on implicit feedback through the PyTorch engine, its embedding tables sharded
across workers (model parallel) or replicated; HR@k and NDCG@k of each held-out item among sampled negatives,
beside a most-popular baseline; `ddl recommend RUN_DIR USER_ID -k 10`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ddl_apps.core.contract import TorchTask, TrainerHooks
from ddl_apps.core.dist import Topology
from ddl_apps.core.rundir import MODEL_DIR, reading_export
from ddl_apps.core.torch_engine import Batch, ColumnSource, load_weights, save_weights
from ddl_apps.errors import DataError
from ddl_apps.recipe import Recipe
from ddl_apps.trainers.recsys import data
from ddl_apps.trainers.recsys.model import NeuMF

ARCHITECTURE, CATALOGUE, HISTORY = "model.json", "catalogue.json", "history.npz"


def held_out_rank(scores: np.ndarray | torch.Tensor):
    """Rank (0 = top) of column 0 among each row's candidates; ties count against it."""
    return (scores[:, 1:] >= scores[:, :1]).sum(1)


def ranking_metrics(rank: np.ndarray, k: int) -> dict[str, float]:
    """HR@k (share of held-out items ranked in the top k) and NDCG@k (1 / log2(rank + 2) when in it)."""
    hit = rank < k
    return {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(np.where(hit, 1 / np.log2(rank + 2), 0.0).mean())}


class RecommendTask(TorchTask):
    def __init__(self, recipe: Recipe, interactions: data.Interactions, topology: Topology):
        cfg, self.model_cfg = recipe.data, recipe.model
        self.interactions, self.top_k, self.seed = interactions, cfg.top_k, recipe.run.seed
        self.shard = (topology.rank, topology.size) if self.model_cfg.model_parallel and topology.size > 1 else None
        split = data.leave_one_out(interactions, cfg.valid_item, cfg.eval_seed)
        users, items = interactions.users, interactions.items
        self.train = data.SampledTraining(users[split.train], items[split.train], interactions.num_items,
                                          cfg.train_negatives)
        seen = data.SeenItems(users, items, interactions.num_items)
        self.valid, self.test = (
            ColumnSource(user=torch.from_numpy(users[rows]), items=torch.from_numpy(
                data.candidates(interactions, rows, seen, cfg.eval_negatives, cfg.eval_seed + offset)))
            for offset, rows in enumerate((split.valid, split.test)))
        self.popularity = np.bincount(items[split.train], minlength=interactions.num_items)

    def architecture(self) -> dict:
        m = self.model_cfg
        return {"num_users": self.interactions.num_users, "num_items": self.interactions.num_items,
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
        known = self.interactions
        (model_dir / CATALOGUE).write_text(json.dumps({"users": known.user_ids, "items": known.item_ids,
                                                       "titles": known.titles}))
        np.savez(model_dir / HISTORY, users=known.users, items=known.items)

    def report(self) -> dict[str, dict[str, float]]:
        """Most popular first (training interactions per item), ranked over the same test candidates."""
        if not self.model_cfg.baseline:
            return {}
        candidates = self.test.columns["items"].numpy()
        rank = held_out_rank(self.popularity[candidates].astype(np.float64))
        return {"baseline most-popular (test)": ranking_metrics(rank, self.top_k)}


def build_task(recipe: Recipe, topology: Topology) -> RecommendTask:
    """Every rank reads and splits the data the same way (a second or so), so nothing is shipped between ranks."""
    return RecommendTask(recipe, data.load_interactions(recipe.data), topology)


def load_exported(model_dir: Path) -> tuple[NeuMF, dict, data.SeenItems]:
    with reading_export(model_dir), np.load(model_dir / HISTORY, allow_pickle=False) as history:
        architecture = json.loads((model_dir / ARCHITECTURE).read_text())
        catalogue = json.loads((model_dir / CATALOGUE).read_text())
        seen = data.SeenItems(history["users"], history["items"], architecture["num_items"])
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


HOOKS = TrainerHooks(build_task=build_task, predict=predict_cli, recommend=recommend_cli)
