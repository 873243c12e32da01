"""Under horovodrun from the repository root: the probe of one engine (RECIPE) trained in each worker's process,
one run after another, into OUT/<name>; each run starts as a new `ddl train` would (its weights equal a launched
run's), without the seconds of a launch and of importing the framework. Phases:
- `np1` (-np 1): the one-worker references, and a run stopped at step 20;
- `np2` (-np 2): the data-parallel runs, runs stopped mid-epoch (a copy of each kept as it stopped) and resumed;
  a run that stops early, the run of as many epochs as its best state trained, and the early run stopped after its
  best evaluation and resumed;
- `gloo` (-np 2 --gloo): a run stopped at step 37 and resumed on Gloo.
test_engines.py asserts on what they leave."""

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # (tests.probe, tests.probe_keras)

from ddl_apps import cli  # noqa: E402
from ddl_apps.core import dist  # noqa: E402
from tests.engine_runs import EARLY_STOPPING, KILLABLE  # noqa: E402

OUT, RECIPE, PHASE = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
SMALL = ("data.train_examples=300", "optim.epochs=1")


def train(name: str, *overrides: str, resume: bool = False) -> None:
    cli.main(["train", RECIPE, f"run.dir={OUT / name}", *overrides, *(["--resume"] if resume else [])],
             standalone_mode=False)


def stop_and_resume(name: str, *overrides: str, stop_at: int) -> None:
    """Train to `stop_at`, keep a copy as it stopped (OUT/<name>-stopped), resume to the end."""
    train(name, *overrides, f"run.max_steps={stop_at}")
    if dist.topology().is_root:
        shutil.copytree(OUT / name, OUT / f"{name}-stopped")
    dist.allreduce_sum([0])  # (the copy is whole before the run goes on)
    train(name, *overrides, resume=True)


if PHASE == "np1":
    train("reference", "optim.batch_size=64")
    train("bf16", "optim.batch_size=64", "run.precision=bf16")
    train("small-np1", *SMALL, "optim.batch_size=3")
    train("stopped-np1", "optim.batch_size=64", "run.max_steps=20")
elif PHASE == "np2":
    train("two-workers", "optim.batch_size=32")
    train("accumulation", "optim.batch_size=16", "optim.accumulation=2")
    train("compressed", "optim.batch_size=32", "dist.compression=fp16")
    train("small-np2", *SMALL, "optim.batch_size=1", "dist.batch_workers=3")
    train("killable", *KILLABLE)
    stop_and_resume("mpi", "optim.batch_size=32", stop_at=37)
    stop_and_resume("fp16", "optim.batch_size=32", "run.precision=fp16", stop_at=20)
    stop_and_resume("streamed", "data.stream=true", "optim.batch_size=32", stop_at=37)
    train("early", *EARLY_STOPPING)
    dist.allreduce_sum([0])  # (rank 0 has written its summary)
    best = json.loads((OUT / "early" / "summary.json").read_text())["early_stopping"]
    train("early-plain", *EARLY_STOPPING[:-2], f"optim.epochs={best['best_epoch']}")
    stop_and_resume("early-resumed", *EARLY_STOPPING, stop_at=best["best_step"] + 5)
else:
    stop_and_resume("gloo", "optim.batch_size=32", stop_at=37)
