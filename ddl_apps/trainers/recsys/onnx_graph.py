"""NeuMF as an ONNX graph: `user` [batch] and candidate `items` [batch, candidates] (indices) -> the probability
that the user interacts with each [batch, candidates], the scores `ddl recommend` ranks. The ids and titles behind
the indices and each user's training items (which `ddl recommend` leaves out) are in the file's metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddl_apps.trainers import onnx_export
from ddl_apps.trainers.recsys.model import NeuMF


class Probabilities(nn.Module):
    def __init__(self, model: NeuMF):
        super().__init__()
        self.model = model

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(user, items))


def seen_by_user(users: np.ndarray, items: np.ndarray, num_users: int) -> list[list[int]]:
    """Each user's items (indices), in order of the users."""
    order = np.lexsort((items, users))
    bounds = np.searchsorted(users[order], np.arange(num_users + 1))
    return [items[order][a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def export(model: NeuMF, catalogue: dict, history: dict[str, np.ndarray], output: Path) -> float:
    """The ONNX file of `ddl export`; the largest absolute difference from the framework on example pairs."""
    rng = np.random.default_rng(0)
    users = rng.integers(model.num_users, size=4)
    example = {"user": users, "items": rng.integers(len(catalogue["items"]), size=(4, 6))}
    metadata = {"users": catalogue["users"], "items": catalogue["items"], "titles": catalogue["titles"],
                "seen_items": seen_by_user(history["users"], history["items"], model.num_users)}
    pairs = {0: "batch", 1: "candidates"}
    return onnx_export.write_torch_onnx(output, Probabilities(model), example, ["probability"],
                                        {"user": {0: "batch"}, "items": pairs, "probability": pairs}, metadata)
