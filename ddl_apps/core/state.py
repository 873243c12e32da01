"""Where training stands, and the protocol of everything whose state a checkpoint or an elastic commit keeps."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """The epoch, the optimizer steps done in it, and the optimizer steps done in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step_in_epoch, self.step = state["epoch"], state["step_in_epoch"], state["step"]

    def advance(self, steps: int) -> None:
        self.step_in_epoch += steps
        self.step += steps

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
