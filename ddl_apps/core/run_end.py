"""The end of a run: weights compared across ranks, the final evaluation, the exported model and summary.json."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from ddl_apps.core import dist, rundir
from ddl_apps.core.contract import BatchSource
from ddl_apps.core.engine import Engine
from ddl_apps.core.evaluator import final_split

Results = dict[str, dict[str, float]]


def weights_digest_by_rank(engine: Engine) -> list[str]:
    """Collective: SHA-256 of every rank's weights, all equal unless data parallelism broke."""
    hashed = hashlib.sha256()
    for array in engine.weights_arrays():  # (one at a time: a sharded model is never whole here)
        hashed.update(np.ascontiguousarray(array).tobytes())
    digest = hashed.digest()
    gathered = dist.allgather_array(np.frombuffer(digest, dtype=np.uint8).copy())
    return [bytes(row).hex() for row in gathered.reshape(engine.topo.size, -1)]


def write_artifacts(engine: Engine, outputs: dict[str, np.ndarray]) -> list[str]:
    """Rank 0, once the model is exported: the task's artifacts (baselines, charts). One that fails is a warning in
    the log and the summary, not a trained run lost."""
    try:
        engine.task.write_artifacts(engine.run_dir, outputs)
    except Exception as e:  # a baseline or a chart of any kind; the model is already exported
        warning = f"the run's artifacts (baselines, charts) were not all written: {type(e).__name__}: {e}"
        engine.log.message(f"warning: {warning}")
        return [warning]
    return []


EXAMPLES = 5  # examples of the final split in a tracked model's input example


def example_batch(source: BatchSource) -> dict[str, Any]:
    return source.take(np.arange(min(EXAMPLES, len(source))))


def parameter_bytes_by_rank(engine: Engine) -> list[dict[str, int]]:
    """Collective: every rank's parameter_bytes, in rank order."""
    memory = engine.parameter_bytes()
    rows = dist.allgather_array(np.array([list(memory.values())], dtype=np.int64))
    return [dict(zip(memory, map(int, row), strict=True)) for row in rows]


def held(memory: dict[str, int]) -> str:
    """'1.2 MiB of parameters, ...' for parameter_bytes' memory (but the sharded part, a part of parameters)."""
    return ", ".join(f"{value / 2**20:.1f} MiB of {key.replace('_', ' ')}" for key, value in memory.items()
                     if key != "sharded")


def finish(engine: Engine, complete: bool) -> Results:
    """Collective: report the run; a complete one (not stopped at run.max_steps) is also evaluated on its test
    split (validation split if it has none) and exported, and rank 0 writes its outputs and summary."""
    task, topo, log = engine.task, engine.topo, engine.log
    results: Results = {}
    done = engine.throughput.summary()
    log.message(f"trained {done['samples']:,} samples in {done['seconds']} s: {done['samples_per_s']} samples/s "
                f"on {topo.size} worker(s)")
    digests = weights_digest_by_rank(engine)
    if len(set(digests)) > 1:
        log.message(f"[bold red]warning:[/] weights differ across ranks: {digests}")
    hosts = dist.hosts_by_rank()
    memory = engine.parameter_bytes()
    memory_by_rank = parameter_bytes_by_rank(engine)
    log.message(f"each worker holds {held(memory)} (rank 0's; dist.zero={engine.recipe.dist.zero})")
    model = engine.exportable_model()
    if complete:
        split, source = final_split(task)
        metrics, outputs = engine.evaluate(source)
        results[f"model ({split})"] = metrics
        log.record(split, engine.state.step, metrics)
        if topo.is_root:
            np.savez(engine.run_dir / f"{split}_outputs.npz", **outputs)  # type: ignore[arg-type]
            task.export(model, engine.run_dir / rundir.MODEL_DIR)
            warnings = write_artifacts(engine, outputs)
            log.model(lambda: task.tracked_model(model, example_batch(source)), engine.run_dir / rundir.MODEL_DIR)
            results.update(task.report())
            summary = {"results": results, "warnings": warnings, "steps": engine.state.step, "workers": topo.size,
                       "hosts_by_rank": hosts, "training": done, "weights_sha256_by_rank": digests,
                       "parameter_bytes_by_rank": memory_by_rank}
            if engine.early_stopping is not None:
                summary["early_stopping"] = engine.early_stopping.summary()
            (engine.run_dir / rundir.SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    log.close(results)
    return results
