"""Elastic training (`ddl train --elastic`): Horovod elastic around the engine's loop.

The loop commits the engine's state in memory every time it reports (each `run.log_every` steps, each checkpoint
and epoch end). When a worker dies, the survivors' next collective fails: they go back to the last commit, Horovod
forms a new ring from the workers left (and any that join), and rank 0's committed state is handed to all.
The global batch stays that of --max-np workers (dist.batch_workers), shared among the workers there are, so the
learning rate, the steps and the examples of each step are the same whatever the number of workers.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import numpy as np
from horovod.common.elastic import State

from ddl_apps.core import dist
from ddl_apps.core.state import Stateful

Result = TypeVar("Result")


class Resizable(Stateful, Protocol):
    topo: dist.Topology

    def resized(self, topology: dist.Topology) -> None: ...
    def handed_over(self, holder: int, hosts: list[str]) -> None: ...
    def placed(self, hosts: list[str]) -> None: ...


class EngineState(State):
    """Horovod's elastic state for an engine: its state_dict, committed in memory."""

    def __init__(self, engine: Resizable):
        super().__init__(bcast_object=dist.broadcast_object, get_rank=lambda: engine.topo.rank)
        self.engine = engine
        self.saved: dict[str, Any] = engine.state_dict()
        self.resets = 0  # changes of workers this worker went through

    def save(self) -> None:
        self.saved = self.engine.state_dict()

    def restore(self) -> None:
        """Back to the commit, which stays as it was: PyTorch's optimizer.load_state_dict keeps the tensors it is
        given as its own, so the steps after would otherwise update the commit in place (and a second failure
        before the next commit would go back to a state that never was)."""
        self.engine.load_state_dict(copy.deepcopy(self.saved))

    def sync(self) -> None:
        """Collective: the newest commit (the most steps; the lowest rank among equals) on every worker, at the start
        (where rank 0 holds the one it resumed from, if any) and after each change of workers."""
        steps_and_resets = dist.allgather_array(np.array([[self.saved["train_state"]["step"], self.resets]]))
        holder = int(np.argmax(steps_and_resets[:, 0]))
        self.saved = dist.broadcast_object(self.saved, root_rank=holder)
        self.restore()
        hosts = dist.hosts_by_rank()
        if steps_and_resets[:, 1].any():  # (a worker that joined has none; those it joined have some)
            self.engine.handed_over(holder, hosts)
        else:
            self.engine.placed(hosts)

    def reset(self) -> None:
        self.resets += 1
        self.engine.resized(dist.topology())


def run(engine: Resizable, horovod_elastic: str, body: Callable[[Callable[[], None]], Result]) -> Result:
    """body(commit) under the elastic.run of the engine's framework (`horovod_elastic`, the module): `commit` saves
    the engine's state in memory."""
    state = EngineState(engine)
    return importlib.import_module(horovod_elastic).run(lambda _state: body(state.commit))(state)
