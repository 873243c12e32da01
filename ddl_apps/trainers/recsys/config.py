"""The recommendation recipe's `data` and `model` sections."""

from typing import Literal

from pydantic import Field

from ddl_apps.data.config import PreparedData
from ddl_apps.recipe import Section

MOVIELENS_100K = "ml-100k"


class DataConfig(PreparedData):
    source: str = Field(MOVIELENS_100K, description=f"'{MOVIELENS_100K}' (shipped by recbole) or a CSV / TSV / "
                        "JSON-lines file")
    user_column: str = "user"
    item_column: str = "item"
    time_column: str = Field("timestamp", description="orders each user's interactions for the leave-one-out split")
    titles: str | None = Field(None, description="CSV / TSV / JSON-lines file with the item column and a 'title' "
                                "column (own data only)")
    valid_item: Literal["random", "previous"] = Field(
        "random", description="validation item per user: a random earlier interaction (the NeuMF paper's choice; "
        "the most recent ones stay in training) or the one just before the test item")
    train_negatives: int = Field(4, ge=1, description="unseen items sampled per interaction, afresh each epoch")
    eval_negatives: int = Field(99, ge=1, description="unseen items ranked against each held-out item")
    eval_seed: int = Field(0, description="seed of the evaluation negatives (fixed for every run)")
    top_k: int = Field(10, ge=1, description="cut-off of HR@k and NDCG@k")


class ModelConfig(Section):
    name: Literal["neumf"] = "neumf"
    gmf_dim: int = Field(32, ge=1, description="width of the matrix-factorisation embeddings")
    mlp_dim: int = Field(32, ge=1, description="width of the MLP tower's embeddings")
    mlp_layers: list[int] = Field(default_factory=lambda: [64, 32, 16], description="MLP tower widths")
    init_std: float = Field(0.01, gt=0, description="embeddings start as N(0, init_std^2)")
    loss: Literal["bce", "bpr"] = Field("bce", description="bce: each item scored as seen / not seen; bpr: each "
                                        "seen item ranked above the user's sampled unseen ones (pairwise)")
    model_parallel: bool = Field(True, description="shard the embedding tables row-wise across workers (alltoall "
                                 "lookups); false replicates them (pure data parallelism)")
    baseline: bool = Field(True, description="report a most-popular-items baseline on the same test")
