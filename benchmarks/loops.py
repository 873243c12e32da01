"""Engine overhead and the DDP peer, on a recipe's own model, data and global batches at np=2.

overhead: in one horovodrun job, the engine's training loop (`Engine.train_loop`, as `ddl train` runs it) and a
minimal hand-written Horovod loop (DistributedOptimizer + broadcast; for Keras, `model.fit` with Horovod's
optimizer and broadcast callback, Horovod's own example) take turns, `--runs` times each. Step-time ratio =
hand-written samples/s / engine samples/s (target <= 1.03).
peer: the same hand-written loop under torch.distributed DDP (torchrun, Gloo) against the engine: throughput ratio
engine / DDP (target >= 1.0).
Each run trains `windows` log windows of `steps` steps; the first (warm-up) is left out and figures are medians
over the other windows of all runs. Writes results/overhead.json and results/peer.json.

    .venv/bin/python benchmarks/loops.py overhead|peer [--recipes fraud_mlp,...] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    VENV_BIN,
    launch_horovod,
    launch_workers,
    report,
    shipped_controller,
    spread,
    write_result,
)

# recipe: (steps per window, windows)
PLAN = {"fraud_mlp": (40, 5), "image_resnet": (6, 6), "nlp_minilm": (3, 5), "asr_conformer": (4, 6)}
OVERHEAD_RECIPES = ["fraud_mlp", "image_resnet"]  # one per engine: PyTorch, Keras
PEER_RECIPES = ["fraud_mlp", "nlp_minilm"]  # short steps (latency-bound) and 91 MB of gradients per step


def load(recipe_name: str, topology) -> tuple:
    """The recipe (logging every window, stopping after the windows), its trainer and task."""
    from ddl_apps.recipe import load_recipe
    from ddl_apps.registry import load_trainer

    steps, windows = PLAN[recipe_name]
    recipe = load_recipe(recipe_name, [f"run.log_every={steps}", f"run.max_steps={steps * windows}",
                                       "run.eval_every_epoch=false", "run.progress=false"])
    trainer = load_trainer(recipe.trainer)
    return recipe, trainer, trainer.load_hooks().build_task(recipe, topology)


def is_keras(trainer) -> bool:
    return trainer.engine == "keras"


def step_batches(recipe, task, topology) -> list[np.ndarray]:
    """This rank's examples for each measured step, as the engine picks them (first epoch's order), computed once
    so that the timed loops only train."""
    from ddl_apps.core import sharding
    from ddl_apps.core.schedule import epoch_steps

    global_batch, _ = epoch_steps(recipe, len(task.train), topology.size)
    order = sharding.epoch_order(len(task.train), recipe.run.seed, 0)
    steps, windows = PLAN[recipe.name]
    return [np.concatenate(sharding.rank_step_batches(order, step, global_batch, topology.rank, topology.size, 1))
            for step in range(steps * windows)]


def timed_windows(step_fn, steps: int, windows: int, samples_per_step: int) -> list[float]:
    """Samples/s of each window of `steps` calls of step_fn(step), the first window left out."""
    rates = []
    for window in range(windows):
        started = time.perf_counter()
        for step in range(window * steps, (window + 1) * steps):
            step_fn(step)
        rates.append(steps * samples_per_step / (time.perf_counter() - started))
    return rates[1:]


# ---- the engine ---------------------------------------------------------------------------------------------
def engine_rates(recipe, trainer, task, topology) -> list[float]:
    """Window samples/s of the engine's own loop (rank 0's run log; other ranks return nothing)."""
    from ddl_apps.core.metrics import read_metrics
    from ddl_apps.core.training import engine_class

    with tempfile.TemporaryDirectory() as run_dir:
        engine_class(trainer)(recipe, task, topology, Path(run_dir)).train_loop()
        return [r["samples_per_s"] for r in read_metrics(Path(run_dir)) if r["split"] == "train"][1:]


# ---- hand-written loops ---------------------------------------------------------------------------------------
def torch_loop_rates(recipe, task, topology, model, optimizer, averaged) -> list[float]:
    """A plain PyTorch loop over the measured steps; `averaged()` surrounds clipping and the optimizer step once the
    gradients are averaged (Horovod: synchronize() first, skip_synchronize() around step(); DDP: already done)."""
    import torch

    clip = recipe.optim.clip_grad_norm
    batches = step_batches(recipe, task, topology)

    def step(i: int) -> None:
        model.train()
        optimizer.zero_grad()
        task.loss(model, task.train.take(batches[i])).backward()
        with averaged():
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()

    steps, windows = PLAN[recipe.name]
    return timed_windows(step, steps, windows, recipe.optim.batch_size * topology.size)


def horovod_torch_rates(recipe, task, topology) -> list[float]:
    import horovod.torch as hvd
    import torch

    from ddl_apps.core.torch_engine import make_optimizer

    optim = recipe.optim
    torch.manual_seed(recipe.run.seed)
    model = task.build_model()
    optimizer = hvd.DistributedOptimizer(make_optimizer(optim, model.parameters(), optim.lr * topology.size),
                                         named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    @contextmanager
    def averaged():
        if optim.clip_grad_norm:  # clipping needs the averaged gradients before step()
            optimizer.synchronize()
            with optimizer.skip_synchronize():
                yield
        else:
            yield

    return torch_loop_rates(recipe, task, topology, model, optimizer, averaged)


def horovod_keras_rates(recipe, task, topology) -> list[float]:
    """Horovod's Keras example: one model.fit over this rank's batches, optimizer and broadcast callback."""
    import horovod.tensorflow.keras as hvd
    import keras
    import tensorflow as tf

    from ddl_apps.core.sharding import epoch_seed
    from ddl_apps.core.tf_engine import augmented, make_optimizer

    optim = recipe.optim
    steps, windows = PLAN[recipe.name]
    keras.utils.set_random_seed(recipe.run.seed)
    model = task.build_model()
    model.compile(optimizer=hvd.DistributedOptimizer(make_optimizer(optim, optim.lr * topology.size)),
                  loss=task.loss)
    batch = task.train.take(np.concatenate(step_batches(recipe, task, topology)))
    dataset = tf.data.Dataset.from_tensor_slices((batch["x"], batch["y"])).batch(optim.batch_size)
    if getattr(task, "augment", None) is not None:
        positions = np.arange(len(batch["x"])) * topology.size + topology.rank  # (zip stops at the last batch)
        dataset = augmented(dataset, task.augment, epoch_seed(recipe.run.seed, 0), positions)

    class WindowTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % steps == 0:
                self.times.append(time.perf_counter())

    timer = WindowTimer()
    model.fit(dataset.prefetch(tf.data.AUTOTUNE), epochs=1, verbose=0,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0), timer])
    samples = steps * optim.batch_size * topology.size
    return [samples / t for t in np.diff(timer.times)][1:]


def ddp_rates(recipe, task, topology) -> list[float]:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from ddl_apps.core.torch_engine import make_optimizer

    torch.manual_seed(recipe.run.seed)
    model = DistributedDataParallel(task.build_model())  # broadcasts rank 0's weights
    optimizer = make_optimizer(recipe.optim, model.parameters(), recipe.optim.lr * topology.size)
    return torch_loop_rates(recipe, task, topology, model, optimizer, nullcontext)  # DDP averages in backward


# ---- workers -------------------------------------------------------------------------------------------------
def horovod_worker(recipe_name: str, runs: int, hand_written: bool = True) -> dict[str, list[float]]:
    """The engine, and (hand_written) the hand-written Horovod loop taking turns with it in one job."""
    from ddl_apps.core import dist
    from ddl_apps.core.training import engine_class
    from ddl_apps.recipe import load_recipe
    from ddl_apps.registry import load_trainer

    shipped = load_recipe(recipe_name)
    topology = engine_class(load_trainer(shipped.trainer)).init(shipped.dist.cycle_time_ms)
    recipe, trainer, task = load(recipe_name, topology)
    hand = horovod_keras_rates if is_keras(trainer) else horovod_torch_rates
    rates: dict[str, list[float]] = {"engine": [], "hand": []}
    for _ in range(runs):
        dist.seed_everything(recipe.run.seed)
        rates["engine"] += engine_rates(recipe, trainer, task, topology)
        if hand_written:
            rates["hand"] += hand(recipe, task, topology)
    return rates


def ddp_worker(recipe_name: str, runs: int) -> dict[str, list[float]]:
    import horovod.torch as hvd
    import torch
    import torch.distributed as td

    from ddl_apps.core import dist
    from ddl_apps.recipe import DistConfig

    td.init_process_group("gloo")
    topology = dist.Topology(td.get_rank(), td.get_world_size(), int(os.environ["LOCAL_RANK"]),
                             int(os.environ["LOCAL_WORLD_SIZE"]))
    dist.init_torch(DistConfig())  # single-process Horovod: trainers build data through the core's on_root
    recipe, _, task = load(recipe_name, topology)
    hvd.shutdown()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // topology.local_size))  # as the engine shares cores
    rates = {"ddp": [r for _ in range(runs) for r in ddp_rates(recipe, task, topology)]}
    td.destroy_process_group()
    return rates


def launch(kind: str, recipe: str, runs: int) -> dict[str, list[float]]:
    worker = [str(Path(__file__).resolve()), "--worker", kind, "--recipes", recipe, "--runs", str(runs)]
    if kind in ("horovod", "engine"):
        return launch_horovod(worker, shipped_controller())
    return launch_workers([str(VENV_BIN / "torchrun"), "--nproc_per_node=2", *worker])


def compare(recipes: list[str], measure, peer_name: str, keys: tuple[str, str], ratio_key: str,
            step_time: bool) -> list[dict]:
    """One row per recipe: ours and the peer's samples/s (`measure(recipe)` gives both lists of window rates) and
    their ratio: peer / ours as a step-time ratio (step_time), else ours / peer as a throughput ratio."""
    rows = []
    for recipe in recipes:
        ours, peer = (spread(rates, 1) for rates in measure(recipe))
        ratio = peer["median"] / ours["median"] if step_time else ours["median"] / peer["median"]
        print(f"{recipe:>14}: ddl_apps {ours['median']:>9,.1f}/s  {peer_name} {peer['median']:>9,.1f}/s  "
              f"{ratio_key} {ratio:.3f}", flush=True)
        rows.append({"recipe": recipe, keys[0]: ours, keys[1]: peer, ratio_key: round(ratio, 3)})
    return rows


def overhead(recipes: list[str], runs: int) -> list[dict]:
    def measure(recipe: str) -> tuple[list[float], list[float]]:
        rates = launch("horovod", recipe, runs)
        return rates["engine"], rates["hand"]

    return compare(recipes, measure, "hand-written", ("engine_samples_per_s", "hand_samples_per_s"),
                   "step_time_ratio", step_time=True)


def peer(recipes: list[str], runs: int) -> list[dict]:
    def measure(recipe: str) -> tuple[list[float], list[float]]:
        return launch("engine", recipe, runs)["engine"], launch("ddp", recipe, runs)["ddp"]

    return compare(recipes, measure, "DDP", ("ddl_apps_samples_per_s", "ddp_samples_per_s"), "throughput_ratio",
                   step_time=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark", nargs="?", choices=["overhead", "peer"])
    parser.add_argument("--recipes", help="comma-separated; default: overhead " + ",".join(OVERHEAD_RECIPES)
                        + ", peer " + ",".join(PEER_RECIPES))
    parser.add_argument("--runs", type=int, default=2, help="turns of each loop per recipe")
    parser.add_argument("--worker", choices=["horovod", "engine", "ddp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "ddp":
            rates = ddp_worker(args.recipes, args.runs)
        else:
            rates = horovod_worker(args.recipes, args.runs, hand_written=args.worker == "horovod")
        report(rates)
        return
    if args.benchmark is None:
        parser.error("name a benchmark: overhead or peer")
    recipes = args.recipes.split(",") if args.recipes else (
        OVERHEAD_RECIPES if args.benchmark == "overhead" else PEER_RECIPES)
    unknown = sorted(set(recipes) - set(PLAN))
    if unknown:
        raise SystemExit(f"no plan for {unknown}; known: {', '.join(PLAN)}")
    rows = (overhead if args.benchmark == "overhead" else peer)(recipes, args.runs)
    write_result(args.benchmark, {"workers": 2, "runs": args.runs, "rows": rows})


if __name__ == "__main__":
    main()
