"""The elastic state of an engine (core/elastic.py): a commit survives the restores and the steps that follow it."""

from __future__ import annotations

import copy

import torch

from ddl_apps.core import dist
from ddl_apps.core.elastic import EngineState


class MomentumEngine:
    """What EngineState needs of an engine, over a model trained by SGD with momentum (state kept in place)."""

    def __init__(self):
        torch.manual_seed(0)
        self.topo = dist.Topology(0, 1, 0, 1)
        self.model = torch.nn.Linear(4, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)

    def step(self) -> None:
        self.optimizer.zero_grad()
        self.model(torch.randn(8, 4)).square().mean().backward()
        self.optimizer.step()

    def state_dict(self):
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load_state_dict(self, state) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def test_a_second_failure_before_the_next_commit_goes_back_to_the_same_commit():
    engine = MomentumEngine()
    engine.step()
    state = EngineState(engine)
    state.save()
    committed = copy.deepcopy(state.saved)
    for _ in range(2):  # a failure, the steps trained after going back, and another failure before a commit
        state.restore()
        engine.step()
        engine.step()
    state.restore()
    for key in ("model", "optimizer"):
        assert str(engine.state_dict()[key]) == str(committed[key])
