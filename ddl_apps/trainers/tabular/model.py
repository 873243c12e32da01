"""Tabular models for binary classification: an MLP over numeric features and learned embeddings of categorical
columns, optionally with periodic embeddings of the numeric features (Gorishniy et al. 2022, "On Embeddings for
Numerical Features in Tabular Deep Learning") and a parameter-efficient ensemble of MLPs (TabM-mini, Gorishniy
et al. 2024: k members share every weight but a per-member scaling of the input and their own output heads).

LayerNorm rather than BatchNorm: it keeps no running statistics, so every rank holds exactly the same state.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def embedding_width(cardinality: int, largest: int) -> int:
    """Common rule of thumb: grows slowly with the number of categories, capped at `largest`."""
    return max(2, min(largest, round(1.6 * cardinality**0.56)))


class PeriodicEmbeddings(nn.Module):
    """Each numeric feature x -> ReLU(Linear([cos(2 pi f x), sin(2 pi f x)])) with trained frequencies f per
    feature (the paper's PLR): lets the MLP fit sharp, non-monotone effects of one feature."""

    def __init__(self, features: int, frequencies: int, width: int, scale: float):
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(features, frequencies) * scale)
        self.weight = nn.Parameter(torch.empty(features, 2 * frequencies, width))
        self.bias = nn.Parameter(torch.empty(features, width))
        bound = 1 / math.sqrt(2 * frequencies)  # nn.Linear's initialisation, one linear layer per feature
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, features] -> [batch, features * width]."""
        angles = 2 * math.pi * self.frequencies * x[..., None]
        periodic = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        embedded = torch.einsum("bfp,fpw->bfw", periodic, self.weight) + self.bias
        return torch.relu(embedded).flatten(1)


class TabularModel(nn.Module):
    """Logits of shape [batch, ensemble]: one column per ensemble member (train each on the loss, average their
    probabilities to predict)."""

    def __init__(self, num_numeric: int, cardinalities: list[int], hidden: list[int], embedding_dim: int,
                 dropout: float, ensemble: int = 1, periodic: dict | None = None):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(c, embedding_width(c, embedding_dim)) for c in cardinalities)
        self.periodic = PeriodicEmbeddings(num_numeric, **periodic) if periodic else None
        numeric_width = num_numeric * periodic["width"] if periodic else num_numeric
        width = numeric_width + sum(embedding_width(c, embedding_dim) for c in cardinalities)
        # Member i sees the input scaled by its own random signs (TabM-mini); a single model sees it unchanged.
        signs = torch.ones(1, width) if ensemble == 1 else torch.randint(0, 2, (ensemble, width)) * 2.0 - 1
        self.member_scaling = nn.Parameter(signs, requires_grad=ensemble > 1)
        layers: list[nn.Module] = []
        for out in hidden:
            layers += [nn.Linear(width, out), nn.LayerNorm(out), nn.ReLU(), nn.Dropout(dropout)]
            width = out
        self.body = nn.Sequential(*layers)
        self.heads = nn.Parameter(torch.empty(ensemble, width).uniform_(-1 / math.sqrt(width), 1 / math.sqrt(width)))
        self.head_bias = nn.Parameter(torch.zeros(ensemble))

    def forward(self, numeric: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        numeric_input = self.periodic(numeric) if self.periodic is not None else numeric
        embedded = [e(categories[:, j]) for j, e in enumerate(self.embeddings)]
        features = torch.cat([numeric_input, *embedded], dim=1)
        hidden = self.body(features[:, None, :] * self.member_scaling)  # [batch, ensemble, width]
        return (hidden * self.heads).sum(-1) + self.head_bias

    def probability(self, numeric: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        """The members' mean probability, [batch]."""
        return torch.sigmoid(self(numeric, categories)).mean(1)


class Scorer(nn.Module):
    """The model on one float array, the numeric features then the category indices (exact in float32):
    [batch, numeric + categorical] -> the members' mean probability [batch]. MLflow's pytorch flavour serves it
    (a model of one input)."""

    def __init__(self, model: TabularModel, numeric: int):
        super().__init__()
        self.model, self.numeric = model, numeric

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.probability(features[:, : self.numeric], features[:, self.numeric :].long())


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, pos_weight: float) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017) with a class weight: down-weights easy, confident examples."""
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = torch.exp(-bce)
    weight = torch.where(target > 0.5, pos_weight, 1.0)
    return (weight * (1 - p_true) ** gamma * bce).mean()
