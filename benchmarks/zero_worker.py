"""Under horovodrun: the text-classification recipe's engine with each ZeRO stage in turn, on the same model and
batches, taking turns: each worker's bytes of parameters, gradients and optimizer state, and the median step time.

    horovodrun -np N .venv/bin/python benchmarks/zero_worker.py [--stages 0 1 2 3] [--rounds R --steps S] [overrides]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import report  # noqa: E402
from ddl_apps.core import dist  # noqa: E402
from ddl_apps.core.run_end import parameter_bytes_by_rank  # noqa: E402
from ddl_apps.core.torch_engine import TorchEngine  # noqa: E402
from ddl_apps.recipe import load_recipe  # noqa: E402
from ddl_apps.registry import load_trainer  # noqa: E402

RECIPE = "nlp_minilm"


def build(recipe, task, topology, stage: int, run_dir: Path) -> TorchEngine:
    recipe = recipe.model_copy(deep=True)
    recipe.dist.zero = stage
    dist.seed_everything(recipe.run.seed)  # the same head on every stage
    (run_dir / f"zero{stage}").mkdir()
    return TorchEngine(recipe, task, topology, run_dir / f"zero{stage}")


def measure(engines: dict[int, TorchEngine], rounds: int, steps: int, warmup: int) -> list[dict]:
    """The engines take turns, `steps` steps each per round (after `warmup` each), so that a slower moment of the
    machine falls on every stage alike; each stage's median step time and what each rank holds."""
    seconds: dict[int, list[float]] = {stage: [] for stage in engines}
    for turn in range(warmup + rounds * steps):
        for stage, engine in engines.items():
            started = time.perf_counter()
            engine.run_steps(turn, 1)
            engine.state.advance(1)
            if turn >= warmup:
                seconds[stage].append(time.perf_counter() - started)
    return [{"stage": stage, "step_s": round(statistics.median(seconds[stage]), 4) if seconds[stage] else None,
             "bytes_by_rank": parameter_bytes_by_rank(engine)} for stage, engine in engines.items()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="per stage and round")
    parser.add_argument("--warmup", type=int, default=2)
    args, overrides = parser.parse_known_args()
    recipe = load_recipe(RECIPE, ["run.progress=false", *overrides])
    topology = TorchEngine.init(recipe.dist)
    task = load_trainer(recipe.trainer).load_hooks().build_task(recipe, topology)
    with tempfile.TemporaryDirectory(prefix="ddl-zero-bench-") as scratch:
        engines = {stage: build(recipe, task, topology, stage, Path(scratch)) for stage in args.stages}
        results = measure(engines, args.rounds, args.steps, args.warmup)
        for engine in engines.values():
            engine.log.close()
    report({"workers": topology.size, "stages": results})


if __name__ == "__main__":
    main()
