"""NeuMF (He et al., 2017): a generalised matrix factorisation and an MLP over user and item embeddings, fused
by one output layer. Users and items share one embedding table (items after users), each row holding both
parts side by side, so a batch needs one lookup: one exchange of ids and rows when the table is sharded across
workers (core/parallel), not one per table."""

from __future__ import annotations

import torch
from torch import nn

from ddl_apps.core.parallel.embedding import embedding_table


class NeuMF(nn.Module):
    def __init__(self, num_users: int, num_items: int, gmf_dim: int, mlp_dim: int, mlp_layers: list[int],
                 init_std: float, seed: int, shard: tuple[int, int] | None = None):
        """`shard` = (rank, size) shards the table; the initial embeddings depend on `seed` alone, so a sharded
        and a replicated model start equal."""
        super().__init__()
        self.num_users, self.gmf_dim = num_users, gmf_dim
        self.embeddings = embedding_table("embeddings", num_users + num_items, gmf_dim + mlp_dim, init_std, seed,
                                          shard)
        layers: list[nn.Module] = []
        inputs = 2 * mlp_dim
        for out in mlp_layers:
            layers += [nn.Linear(inputs, out), nn.ReLU()]
            inputs = out
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(gmf_dim + inputs, 1)

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits of `items` [batch, candidates] for `user` [batch]: [batch, candidates]."""
        rows = self.embeddings(torch.cat([user[:, None], items + self.num_users], dim=1))
        u, v = rows[:, :1].expand(-1, items.shape[1], -1), rows[:, 1:]
        g = self.gmf_dim
        mlp = self.mlp(torch.cat([u[..., g:], v[..., g:]], dim=-1))
        return self.head(torch.cat([u[..., :g] * v[..., :g], mlp], dim=-1)).squeeze(-1)


class CandidateScorer(nn.Module):
    """The model on one array per row, the user's index then its candidate items' [batch, 1 + candidates] -> the
    candidates' logits [batch, candidates]. MLflow's pytorch flavour serves it (a model of one input)."""

    def __init__(self, model: NeuMF):
        super().__init__()
        self.model = model

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.model(rows[:, 0], rows[:, 1:])
