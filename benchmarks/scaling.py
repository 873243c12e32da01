"""Scaling: every recipe's training throughput at np=1 and np=2, one compute thread per worker
(OMP_NUM_THREADS=1), through `ddl train` as users run it. A run trains `windows` log windows of `steps` steps;
the first window (start-up, graph tracing) is left out and the figure is the median of the others' samples/s
over all runs. Scaling efficiency = throughput(np=2) / (2 x throughput(np=1)). Writes results/scaling.json.

    .venv/bin/python benchmarks/scaling.py [--recipes fraud_mlp,...] [--runs 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import VENV_BIN, run, spread, write_result  # noqa: E402
from ddl_apps.core.metrics import read_metrics  # noqa: E402
from ddl_apps.recipe import load_recipe  # noqa: E402

# recipe: (steps per window, windows); windows of a few seconds at one thread per worker
PLAN = {
    "fraud_mlp": (40, 7),
    "image_resnet": (6, 7),
    "asr_conformer": (4, 7),
    "nlp_minilm": (3, 7),
    "recsys_neumf": (60, 7),
}


def window_rates(recipe: str, np: int, steps: int, windows: int, overrides: list[str]) -> list[float]:
    """Samples/s of each log window after the first, from one `ddl train` run."""
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        run([str(VENV_BIN / "ddl"), "train", recipe, "-np", str(np), f"run.dir={run_dir}",
             f"run.log_every={steps}", f"run.max_steps={steps * windows}", "run.eval_every_epoch=false",
             "run.progress=false", *overrides], env={"OMP_NUM_THREADS": "1"})
        rates = [r["samples_per_s"] for r in read_metrics(run_dir) if r["split"] == "train"]
    if len(rates) != windows:
        raise SystemExit(f"{recipe} at np={np}: expected {windows} log windows, the run logged {len(rates)}")
    return rates[1:]


def measure(recipe: str, runs: int, overrides: list[str]) -> dict:
    steps, windows = PLAN[recipe]
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(runs):
        for np in (1, 2):
            rates[np] += window_rates(recipe, np, steps, windows, overrides)
    one, two = spread(rates[1], 1), spread(rates[2], 1)
    efficiency = two["median"] / (2 * one["median"])
    optim = load_recipe(recipe, overrides).optim
    step_ms = {np: round(optim.batch_size * optim.accumulation * np / rate["median"] * 1e3, 1)
               for np, rate in ((1, one), (2, two))}
    print(f"{recipe:>14}: np=1 {one['median']:>9,.1f}/s  np=2 {two['median']:>9,.1f}/s  efficiency "
          f"{efficiency:.2f}", flush=True)
    return {"recipe": recipe, "steps_per_window": steps, "windows": windows - 1, "runs": runs,
            "np1_samples_per_s": one, "np2_samples_per_s": two, "efficiency": round(efficiency, 3),
            "step_ms_np1": step_ms[1], "step_ms_np2": step_ms[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(PLAN), help="comma-separated; default: all")
    parser.add_argument("--runs", type=int, default=1, help="runs per recipe and worker count")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run")
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    unknown = sorted(set(recipes) - set(PLAN))
    if unknown:
        raise SystemExit(f"no scaling plan for {unknown}; known: {', '.join(PLAN)}")
    rows = [measure(recipe, args.runs, args.overrides) for recipe in recipes]
    write_result("scaling", {"threads_per_worker": 1, "overrides": args.overrides, "rows": rows})


if __name__ == "__main__":
    main()
