"""Elastic training (`ddl train --elastic`): Horovod elastic around the engine's loop.

The engine commits its state in memory every time it reports (each `run.log_every` steps, each checkpoint and
epoch end). When a worker dies, the survivors' next collective fails: they go back to the last commit, Horovod
forms a new ring from the workers left (and any that join), and rank 0's committed state is handed to all.
The global batch stays that of --max-np workers (dist.batch_workers), shared among the workers there are, so the
learning rate, the steps and the examples of each step are the same whatever the number of workers.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from horovod.common.elastic import State

from ddl_apps.core import dist

if TYPE_CHECKING:
    from ddl_apps.core.engine import Engine


class EngineState(State):
    """Horovod's elastic state for an engine: its model, optimizer, schedule and progress."""

    def __init__(self, engine: Engine):
        super().__init__(bcast_object=dist.broadcast_object, get_rank=lambda: engine.topo.rank)
        self.engine = engine
        self.saved = self._capture()

    def _capture(self) -> dict:
        return {"progress": asdict(self.engine.progress), "state": self.engine.memory_state()}

    def save(self) -> None:
        self.saved = self._capture()

    def restore(self) -> None:
        from ddl_apps.core.engine import Progress

        self.engine.load_memory_state(self.saved["state"])
        self.engine.progress = Progress(**self.saved["progress"])

    def sync(self) -> None:
        """Rank 0's committed state on every worker (the start, and after each change of workers)."""
        self.saved = dist.broadcast_object(self.saved)
        self.restore()

    def reset(self) -> None:
        self.engine.resized(dist.topology())


def run(engine: Engine) -> dict[str, dict[str, float]]:
    """engine.train_loop() under Horovod elastic (PyTorch engine)."""
    import horovod.torch.elastic as hvd_elastic

    state = EngineState(engine)
    engine.commit = state.commit
    return hvd_elastic.run(lambda _state: engine.train_loop())(state)
