"""An MLP over standardised numeric features and learned embeddings of categorical columns.

LayerNorm rather than BatchNorm: it keeps no running statistics, so every rank holds exactly the same state.
"""

from __future__ import annotations

import torch
from torch import nn


def embedding_width(cardinality: int, largest: int) -> int:
    """Common rule of thumb: grows slowly with the number of categories, capped at `largest`."""
    return max(2, min(largest, round(1.6 * cardinality**0.56)))


class TabularMLP(nn.Module):
    def __init__(self, num_numeric: int, cardinalities: list[int], hidden: list[int], embedding_dim: int,
                 dropout: float):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(c, embedding_width(c, embedding_dim)) for c in cardinalities)
        width = num_numeric + sum(embedding_width(c, embedding_dim) for c in cardinalities)
        layers: list[nn.Module] = []
        for out in hidden:
            layers += [nn.Linear(width, out), nn.LayerNorm(out), nn.ReLU(), nn.Dropout(dropout)]
            width = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)

    def forward(self, numeric: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        """Fraud logits, shape [batch]."""
        embedded = [e(categories[:, j]) for j, e in enumerate(self.embeddings)]
        return self.head(self.body(torch.cat([numeric, *embedded], dim=1))).squeeze(1)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, pos_weight: float) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017) with a class weight: down-weights easy, confident examples."""
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = torch.exp(-bce)
    weight = torch.where(target > 0.5, pos_weight, 1.0)
    return (weight * (1 - p_true) ** gamma * bce).mean()
