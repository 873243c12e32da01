"""Launching `ddl train` on the probe trainer (or any recipe) from tests, and reading what runs leave."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parent.parent
WORKERS = REPO / "tests" / "workers"  # scripts run under horovodrun
PROBE = "tests/probe/digits.yaml"
PROBES = {"torch": PROBE, "keras": "tests/probe_keras/digits.yaml"}  # the same data and model in each engine
KILLABLE = ("optim.batch_size=32", "optim.epochs=6", "run.checkpoint_every=7")  # 144 steps, a checkpoint every 7
# Up to 30 epochs of 24 steps, stopped 2 evaluations after the best; a constant learning rate (but the warm-up), so
# a run of fewer epochs trains what the first ones of a longer run do. The last two: early stopping.
EARLY_STOPPING = ("optim.batch_size=32", "optim.epochs=30", "optim.schedule=constant",
                  "run.early_stopping.metric=accuracy", "run.early_stopping.patience=2")


def ddl(*args: str, timeout: float = 600, python_path: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """Run the `ddl` CLI from the repository root (so `tests.probe` imports in every worker), with `python_path`
    also importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (REPO, *python_path))), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "ddl_apps.cli", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


def train(run_dir: Path, *overrides: str, np: int = 1, recipe: str = PROBE, flags: tuple[str, ...] = ()) -> Path:
    result = ddl("train", recipe, f"run.dir={run_dir}", *overrides, "-np", str(np), *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


@contextmanager
def start_training(run_dir: Path, recipe: str, *args: str, env: dict[str, str] | None = None
                   ) -> Iterator[subprocess.Popen]:
    """`ddl train RECIPE` in the background (output captured, `env` added to the environment), for tests that kill
    it. Whatever is left of it (launcher and workers) is killed on the way out, so a run that hangs fails its test
    instead of hanging it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "ddl_apps.cli", "train", recipe, f"run.dir={run_dir}", *args]
    with subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as job:
        try:
            yield job
        finally:
            kill_training(run_dir)


def kill_training(run_dir: Path, rank: int | None = None) -> list[int]:
    """SIGKILL the launcher and workers of `run_dir` (only the worker of `rank`, if given); the pids found. One that
    exits before its turn (a worker dies with its launcher) is not an error."""
    victims = training_processes(run_dir, rank)
    for pid in victims:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return victims


def training_processes(run_dir: Path, rank: int | None = None) -> list[int]:
    """The launcher and workers of the `ddl train` of `run_dir` (only the worker of `rank`, if given)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline, environ = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone
            continue
        if f"run.dir={run_dir}".encode() in cmdline and (rank is None or f"HOROVOD_RANK={rank}".encode() in environ):
            found.append(int(proc.name))
    return found


def trained(name: str) -> bool:
    """Not BatchNorm's moving statistics (a filter for final_weights; Keras and PyTorch names), which N workers
    average among themselves while one worker updates them micro-batch after micro-batch."""
    keras_statistic = "batch_normalization" in name and name.endswith(("vars/2", "vars/3"))
    return not (keras_statistic or name.endswith(("running_mean", "running_var", "num_batches_tracked")))


def final_weights(run_dir: Path, keep: Callable[[str], bool] = lambda name: True) -> np.ndarray:
    """The exported weights whose names `keep` keeps, as one float64 vector (PyTorch: safetensors; Keras:
    .weights.h5)."""
    torch_weights = run_dir / "model" / "model.safetensors"
    if torch_weights.exists():
        weights = load_file(str(torch_weights))
        return np.concatenate([weights[k].ravel() for k in sorted(weights) if keep(k)]).astype(np.float64)
    import h5py

    arrays = []
    with h5py.File(run_dir / "model" / "model.weights.h5", "r") as f:
        f["layers"].visititems(lambda name, obj: arrays.append((name, obj[()]))
                               if isinstance(obj, h5py.Dataset) and keep(name) else None)  # (not the optimizer's)
    return np.concatenate([np.ravel(a) for _, a in sorted(arrays, key=lambda item: item[0])]).astype(np.float64)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def launch_worker(script: str, controller: str, np: int = 2, timeout: float = 300, args: tuple[str, ...] = ()) -> str:
    """Run a script of tests/workers under horovodrun (`args` after it); its output (the test fails if it does)."""
    from ddl_apps.core.launch import run_horovod

    result = run_horovod([sys.executable, str(WORKERS / script), *args], np, controller, timeout=timeout,
                         capture=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output
