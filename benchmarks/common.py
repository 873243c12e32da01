"""What the benchmarks share: where results go, the machine they ran on, medians with their spread, and
running a launcher to completion with a clear error when it fails."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("DDL_BENCH_RESULTS", REPO / "benchmarks" / "results"))  # (tests: elsewhere)
VENV_BIN = REPO / ".venv" / "bin"
# horovodrun's Open MPI refuses root unless told; the benchmarks run wherever `make bench` runs
LAUNCH_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    """Median, min and max of repeated measurements, and how many there were."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}


def machine() -> dict[str, object]:
    """The machine and software a result came from (BENCHMARKS.md prints it beside every table)."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    memory_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    versions = {}
    for package, distributions in {"torch": ["torch"], "tensorflow": ["tensorflow", "tensorflow-cpu"],
                                   "horovod": ["horovod"]}.items():
        versions[package] = "not installed"
        for distribution in distributions:
            try:
                versions[package] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_kb / 2**20, 1),
            "python": platform.python_version(), "kernel": platform.release(), **versions,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def write_result(name: str, payload: dict) -> Path:
    """benchmarks/results/NAME.json with the machine added; written whole or not at all."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    tmp.replace(path)
    print(f"wrote {path}", flush=True)
    return path


def read_result(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 1800) -> str:
    """Run a launcher (horovodrun, torchrun, ddl) to completion; its output, or SystemExit with its tail."""
    result = subprocess.run(argv, env={**os.environ, **LAUNCH_ENV, **(env or {})}, capture_output=True, text=True,
                            timeout=timeout, check=False)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed (exit {result.returncode}):\n{output[-3000:]}")
    return output


def window_rates(run_dir: Path, windows: int, what: str) -> list[float]:
    """Samples/s of each log window of a finished run after the first (start-up); `what` names the run."""
    from ddl_apps.core.metrics import read_metrics

    rates = [r["samples_per_s"] for r in read_metrics(run_dir) if r["split"] == "train"]
    if len(rates) != windows:
        raise SystemExit(f"{what}: expected {windows} log windows, the run logged {len(rates)}")
    return rates[1:]


RESULT_ENV = "DDL_BENCH_RESULT"  # where a launched job's rank 0 writes its result (stdout splits long lines)


def shipped_controller() -> str:
    """The controller `ddl train` picks for a recipe's default `dist.controller` on one host."""
    from ddl_apps.core.launch import choose_controller
    from ddl_apps.recipe import DistConfig

    return choose_controller(DistConfig().controller, elastic=False, hosts=[])


def launch_horovod(worker: list[str], controller: str, env: dict[str, str] | None = None) -> dict:
    """`worker` (a Python script and its arguments) on 2 Horovod workers, launched as the core launches
    (`core.launch`: the same horovodrun command line and shipped environment); rank 0's result."""
    from ddl_apps.core.launch import horovodrun_command, worker_env

    return launch_workers(horovodrun_command([sys.executable, *worker], 2, controller),
                          worker_env(controller, elastic=None, env=env))


def launch_workers(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run a launcher whose workers call report(); rank 0's result."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "result.json"
        output = run(command, {**(env or {}), RESULT_ENV: str(path)})
        if not path.exists():
            raise SystemExit(f"the workers wrote no result:\n{output[-3000:]}")
        return json.loads(path.read_text())


def report(result: dict) -> None:
    """In a worker: hand the result to launch_workers (rank 0 only)."""
    rank = next((os.environ[v] for v in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "RANK") if v in os.environ), "0")
    if rank == "0":  # horovodrun (Gloo), mpirun, torchrun
        Path(os.environ[RESULT_ENV]).write_text(json.dumps(result))
