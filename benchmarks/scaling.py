"""Scaling: every recipe's training throughput at np=1 and np=2 with one core per worker, through `ddl train` as
users run it. Each job runs on exactly `np` cores (`taskset`), one compute thread per worker (OMP_NUM_THREADS=1):
a worker alone on a 2-core machine otherwise gets the idle core for its helper threads (tf.data, Horovod's
background thread) for free, which flatters np=1 (up to 13 %, recommendation); that figure is reported beside.
A run trains `windows` log windows of `steps` steps; the first window (start-up, graph tracing) is left out and
the figure is the median of the others' samples/s over all runs. Scaling efficiency = throughput(np=2) /
(2 x throughput(np=1)).

Where a step at np=2 goes beyond its compute is read from a Horovod timeline of one more np=2 run
(benchmarks/timeline.py): per step, the collectives' execution (fusion-buffer copies and the MPI / Gloo operation) and
the negotiation (until every worker has submitted: waiting for the slower one). `--autotune` also trains
AUTOTUNE_RECIPE at np=2 under Horovod's autotuner and reports what it settled on and the throughput after tuning.
Writes results/scaling.json.

    .venv/bin/python benchmarks/scaling.py [--recipes fraud_mlp,...] [--runs 1] [--autotune]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import timeline  # noqa: E402
from benchmarks.common import VENV_BIN, run, spread, window_rates, write_result  # noqa: E402
from ddl_apps.recipe import load_recipe  # noqa: E402

# recipe: (steps per window, windows); windows of a few seconds at one thread per worker
PLAN = {
    "fraud_mlp": (40, 7),
    "image_resnet": (6, 7),
    "asr_conformer": (4, 7),
    "nlp_minilm": (3, 7),
    "recsys_neumf": (60, 7),
}
TIMELINE_WINDOWS = 3  # the timeline run: the first window skipped, the other two averaged
# The tuner scores a sample every ~55 steps; its whole search (21 Bayesian samples of cycle time and fusion
# threshold for each combination of 4 on/off settings, ~336 samples) would take ~18,000 steps: 3,000 steps (more
# than the recipe's 3 epochs) show where it heads, and the report says whether it ended.
AUTOTUNE_RECIPE, AUTOTUNE_WINDOWS, AUTOTUNE_STEPS, AUTOTUNE_EPOCHS = "fraud_mlp", 15, 200, 8


def train(recipe: str, np: int, steps: int, windows: int, overrides: list[str], run_dir: Path,
          cores: int | None, env: dict[str, str] | None = None) -> list[float]:
    """Samples/s of each log window after the first, from one `ddl train` run (on the first `cores` cores)."""
    pin = ["taskset", "-c", f"0-{cores - 1}"] if cores else []
    run([*pin, str(VENV_BIN / "ddl"), "train", recipe, "-np", str(np), f"run.dir={run_dir}",
         f"run.log_every={steps}", f"run.max_steps={steps * windows}", "run.eval_every_epoch=false",
         "run.progress=false", *overrides], env={"OMP_NUM_THREADS": "1", **(env or {})})
    return window_rates(run_dir, windows, f"{recipe} at np={np}")


def measure(recipe: str, runs: int, overrides: list[str]) -> dict:
    steps, windows = PLAN[recipe]
    rates: dict[str, list[float]] = {"np1": [], "np1_spare_core": [], "np2": []}
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(runs):
            for key, np, cores in (("np1", 1, 1), ("np1_spare_core", 1, None), ("np2", 2, 2)):
                rates[key] += train(recipe, np, steps, windows, overrides, Path(scratch) / f"{key}-{i}", cores)
        trace = Path(scratch) / "timeline.json"
        train(recipe, 2, steps, TIMELINE_WINDOWS, overrides, Path(scratch) / "timeline", cores=2,
              env={"HOROVOD_TIMELINE": str(trace)})
        breakdown = timeline.per_step_ms(trace, skip=steps)
    one, spare, two = (spread(rates[k], 1) for k in ("np1", "np1_spare_core", "np2"))
    efficiency = two["median"] / (2 * one["median"])
    optim = load_recipe(recipe, overrides).optim
    step_ms = {np: round(optim.batch_size * optim.accumulation * np / rate["median"] * 1e3, 1)
               for np, rate in ((1, one), (2, two))}
    print(f"{recipe:>14}: np=1 {one['median']:>9,.1f}/s  np=2 {two['median']:>9,.1f}/s  efficiency "
          f"{efficiency:.2f} (np=1 with a spare core {spare['median']:,.1f}/s)  timeline at np=2: step "
          f"{breakdown['step_ms']} ms, collectives {breakdown['collectives_ms']} ms, negotiation "
          f"{breakdown['negotiation_ms']} ms", flush=True)
    return {"recipe": recipe, "steps_per_window": steps, "windows": windows - 1, "runs": runs,
            "np1_samples_per_s": one, "np1_spare_core_samples_per_s": spare, "np2_samples_per_s": two,
            "efficiency": round(efficiency, 3),
            "efficiency_vs_spare_core": round(two["median"] / (2 * spare["median"]), 3),
            "step_ms_np1": step_ms[1], "step_ms_np2": step_ms[2], "timeline_np2": breakdown}


def autotuned(overrides: list[str]) -> dict:
    """AUTOTUNE_RECIPE at np=2 under HOROVOD_AUTOTUNE=1: the tuner's log (every sample it scored; once tuning ends,
    its best again as the last row), and the median samples/s of the last third's windows beside the shipped
    settings'."""
    windows, overrides = AUTOTUNE_WINDOWS, [f"optim.epochs={AUTOTUNE_EPOCHS}", *overrides]
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "autotune.csv"
        tuned = train(AUTOTUNE_RECIPE, 2, AUTOTUNE_STEPS, windows, overrides, Path(scratch) / "tuned", cores=2,
                      env={"HOROVOD_AUTOTUNE": "1", "HOROVOD_AUTOTUNE_LOG": str(log)})
        shipped = train(AUTOTUNE_RECIPE, 2, AUTOTUNE_STEPS, windows, overrides, Path(scratch) / "shipped", cores=2)
        samples = [{k.strip(): v.strip() for k, v in row.items()}
                   for row in csv.DictReader(log.read_text().splitlines())] if log.exists() else []
    last = windows // 3
    best = max(samples, key=lambda row: float(row["score"]), default=None)
    result = {"recipe": AUTOTUNE_RECIPE, "steps": AUTOTUNE_STEPS * windows, "samples_scored": len(samples),
              "finished": bool(samples) and samples[-1] == best, "best": best,
              "tuned_samples_per_s": round(statistics.median(tuned[-last:]), 1),
              "shipped_samples_per_s": round(statistics.median(shipped[-last:]), 1)}
    print(f"autotune on {AUTOTUNE_RECIPE}: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(PLAN), help="comma-separated; default: all")
    parser.add_argument("--runs", type=int, default=1, help="runs per recipe and worker count")
    parser.add_argument("--autotune", action="store_true", help=f"also {AUTOTUNE_RECIPE} under Horovod's autotuner")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run")
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    unknown = sorted(set(recipes) - set(PLAN))
    if unknown:
        raise SystemExit(f"no scaling plan for {unknown}; known: {', '.join(PLAN)}")
    rows = [measure(recipe, args.runs, args.overrides) for recipe in recipes]
    write_result("scaling", {"threads_per_worker": 1, "cores_per_worker": 1, "overrides": args.overrides,
                             "rows": rows, "autotune": autotuned(args.overrides) if args.autotune else None})


if __name__ == "__main__":
    main()
