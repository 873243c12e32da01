"""NeuMF as an ONNX graph: `user` [batch] and candidate `items` [batch, candidates] (indices) -> the probability
that the user interacts with each [batch, candidates], the scores `ddl recommend` ranks. The ids and titles behind
the indices and each user's training items (which `ddl recommend` leaves out) are in the file's metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddl_apps.trainers import onnx_export
from ddl_apps.trainers.recsys.data import SeenItems
from ddl_apps.trainers.recsys.model import NeuMF


class Probabilities(nn.Module):
    def __init__(self, model: NeuMF):
        super().__init__()
        self.model = model

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(user, items))


def export(model: NeuMF, catalogue: dict, seen: SeenItems, output: Path) -> float:
    """The ONNX file of `ddl export`; the largest absolute difference from the framework on example pairs."""
    rng = np.random.default_rng(0)
    users = rng.integers(model.num_users, size=4)
    example = {"user": users, "items": rng.integers(len(catalogue["items"]), size=(4, 6))}
    metadata = {"users": catalogue["users"], "items": catalogue["items"], "titles": catalogue["titles"],
                "seen_items": seen.by_user(model.num_users)}
    pairs = {0: "batch", 1: "candidates"}
    return onnx_export.write_torch_onnx(output, Probabilities(model), example, ["probability"],
                                        {"user": {0: "batch"}, "items": pairs, "probability": pairs}, metadata)
