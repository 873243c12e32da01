"""Where a training step's communication time goes, from a Horovod timeline (HOROVOD_TIMELINE=FILE, written by
rank 0: one row of Chrome-trace events per tensor).

Each collective on a tensor is a negotiation (NEGOTIATE_ALLREDUCE, ...: from this worker submitting the tensor
until every worker has, so mostly waiting for the slower worker) followed by its execution (ALLREDUCE, ALLTOALL,
...: fusion-buffer copies and the MPI or Gloo operation). Tensors that go through a collective once per step (the
gradients; a sharded model's lookups) are the ones with the most executions; step k is their k-th collectives,
and its time is the union of their intervals (a fused allreduce runs all its tensors at once). Figures are means
over the steps after the first `skip` (start-up: one worker waits while the other traces its graph), as the mean
is what throughput pays, with the step time of the same run (from one step's first negotiation to the next's):
writing the timeline slows a run, so the shares are what to compare with another run.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path


def read_events(path: Path) -> list[dict]:
    """The trace's events; Horovod leaves the JSON array open (and may end it with a comma) when it stops."""
    text = path.read_text().rstrip().rstrip(",")
    return json.loads(text if text.endswith("]") else text + "]")


def top_level_phases(events: list[dict]) -> dict[int, list[tuple[str, int, int]]]:
    """Per tensor row (pid): its outermost phases in order, as (name, start us, end us)."""
    open_phases: dict[int, list[tuple[str, int]]] = defaultdict(list)
    phases: dict[int, list[tuple[str, int, int]]] = defaultdict(list)
    for event in events:
        stack = open_phases[event.get("pid", -1)]
        if event["ph"] == "B":
            stack.append((event["name"], event["ts"]))
        elif event["ph"] == "E" and stack:
            name, start = stack.pop()
            if not stack:
                phases[event["pid"]].append((name, start, event["ts"]))
    return phases


def covered_us(intervals: list[tuple[int, int]]) -> int:
    """Microseconds covered by the union of the intervals."""
    total, reached = 0, None
    for start, end in sorted(intervals):
        if reached is None or start > reached:
            total, reached = total + end - start, end
        elif end > reached:
            total, reached = total + end - reached, end
    return total


def per_step_ms(path: Path, skip: int) -> dict[str, float]:
    """Mean milliseconds per step: the whole step, in collectives' execution and in negotiation; and the steps."""
    by_tensor = top_level_phases(read_events(path))
    executions = {pid: [p for p in phases if not p[0].startswith("NEGOTIATE_")] for pid, phases in by_tensor.items()}
    negotiations = {pid: [p for p in phases if p[0].startswith("NEGOTIATE_")] for pid, phases in by_tensor.items()}
    steps = max((len(v) for v in executions.values()), default=0)
    per_step = [pid for pid, v in executions.items() if len(v) == steps and len(negotiations[pid]) == steps]
    if steps <= skip or not per_step:
        raise ValueError(f"{path}: no collective repeated on more than {skip} steps")

    def mean_ms(phases: dict[int, list[tuple[str, int, int]]]) -> float:
        spans = [covered_us([phases[pid][k][1:] for pid in per_step]) for k in range(skip, steps)]
        return round(statistics.mean(spans) / 1e3, 2)

    starts = [min(negotiations[pid][k][1] for pid in per_step) for k in range(skip, steps)]
    step = (starts[-1] - starts[0]) / (len(starts) - 1) if len(starts) > 1 else 0.0
    return {"step_ms": round(step / 1e3, 2), "collectives_ms": mean_ms(executions),
            "negotiation_ms": mean_ms(negotiations), "steps": steps - skip}
