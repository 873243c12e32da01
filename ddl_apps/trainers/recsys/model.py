"""NeuMF (He et al., 2017): a generalised matrix factorisation and an MLP over user and item embeddings, fused
by one output layer. Each of the user and item tables holds both parts side by side (one lookup each), and may be
sharded across workers (core/parallel)."""

from __future__ import annotations

import torch
from torch import nn

from ddl_apps.core.parallel.embedding import embedding_table


class NeuMF(nn.Module):
    def __init__(self, num_users: int, num_items: int, gmf_dim: int, mlp_dim: int, mlp_layers: list[int],
                 init_std: float, seed: int, shard: tuple[int, int] | None = None):
        """`shard` = (rank, size) shards both tables; the initial embeddings depend on `seed` alone, so a sharded
        and a replicated model start equal."""
        super().__init__()
        self.gmf_dim = gmf_dim
        width = gmf_dim + mlp_dim
        self.users = embedding_table("users", num_users, width, init_std, seed, shard)
        self.items = embedding_table("items", num_items, width, init_std, seed + 1, shard)
        layers: list[nn.Module] = []
        inputs = 2 * mlp_dim
        for out in mlp_layers:
            layers += [nn.Linear(inputs, out), nn.ReLU()]
            inputs = out
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(gmf_dim + inputs, 1)

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits of `items` [batch, candidates] for `user` [batch]: [batch, candidates]."""
        u = self.users(user)[:, None, :].expand(-1, items.shape[1], -1)
        v = self.items(items)
        g = self.gmf_dim
        mlp = self.mlp(torch.cat([u[..., g:], v[..., g:]], dim=-1))
        return self.head(torch.cat([u[..., :g] * v[..., :g], mlp], dim=-1)).squeeze(-1)
