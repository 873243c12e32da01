"""Allreduce at np=2 on one host: the ddl_apps core (Horovod with the settings the core ships) against
torch.distributed with Gloo, fp32 tensors from 4 KB to 256 MB. Each size is timed `--repeats` times after two
warm-up calls, every call between barriers; the report gives the median, the spread (min-max), the algorithm
bandwidth and the ratio torch.distributed / ddl_apps (above 1: the core is faster). `--controller` adds the core
with the other controller. (Horovod's autotuner is measured on training, in scaling.py: it scores a sample only
after the same tensors ran many times, about 55 training steps, which a sweep of single calls never gives it.)
Writes results/allreduce.json.

    .venv/bin/python benchmarks/allreduce.py [--repeats 10] [--max-mb 256] [--controller mpi]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

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
from ddl_apps.recipe import DistConfig  # noqa: E402

PEER = "torch.distributed (Gloo)"
SHIPPED_CONTROLLER = shipped_controller()


def sizes_bytes(max_mb: float) -> list[int]:
    sizes, size = [], 4 * 1024
    while size <= max_mb * 1024 * 1024:
        sizes.append(size)
        size *= 4
    return sizes


def time_calls(allreduce, barrier, size: int, repeats: int) -> list[float]:
    import torch

    tensor = torch.ones(size // 4, dtype=torch.float32)
    for _ in range(2):
        allreduce(tensor)
    seconds = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        allreduce(tensor)
        seconds.append(time.perf_counter() - start)
    return seconds


def horovod_worker(sizes: list[int], repeats: int) -> dict[int, list[float]]:
    import horovod.torch as hvd
    import torch

    from ddl_apps.core import dist

    dist.init_torch(DistConfig())  # what every recipe gets unless it sets its own

    def barrier():
        hvd.allreduce(torch.zeros(1), name="bench.barrier")

    return {size: time_calls(lambda t: hvd.allreduce_(t, op=hvd.Sum, name=f"bench.{t.numel()}"), barrier, size,
                             repeats) for size in sizes}


def torch_worker(sizes: list[int], repeats: int) -> dict[int, list[float]]:
    import torch
    import torch.distributed as td

    td.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // td.get_world_size()))
    timings = {size: time_calls(lambda t: td.all_reduce(t), td.barrier, size, repeats) for size in sizes}
    td.destroy_process_group()  # else Gloo's threads abort the process at exit
    return timings


def launch(runner: str, sizes: list[int], repeats: int) -> dict[int, list[float]]:
    """Seconds per call for each size; runner: torch, or a Horovod controller (gloo / mpi)."""
    worker = [str(Path(__file__).resolve()), "--worker", "torch" if runner == "torch" else "horovod",
              "--repeats", str(repeats), "--sizes", ",".join(map(str, sizes))]
    if runner == "torch":
        timings = launch_workers([str(VENV_BIN / "torchrun"), "--nproc_per_node=2", *worker])
    else:
        timings = launch_horovod(worker, runner)
    return {int(k): v for k, v in timings.items()}


def summarise(seconds: list[float], size: int) -> dict[str, float]:
    ms = spread([s * 1e3 for s in seconds])
    return {"median_ms": ms["median"], "min_ms": ms["min"], "max_ms": ms["max"],
            "algbw_gb_s": round(size / (ms["median"] / 1e3) / 1e9, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-mb", type=float, default=256)
    parser.add_argument("--controller", choices=["gloo", "mpi"], help="also the core with this controller")
    parser.add_argument("--worker", choices=["horovod", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sizes = [int(s) for s in args.sizes.split(",")]
        timings = (horovod_worker if args.worker == "horovod" else torch_worker)(sizes, args.repeats)
        report(timings)
        return
    sizes = sizes_bytes(args.max_mb)
    shipped = DistConfig()
    ours = f"ddl_apps ({SHIPPED_CONTROLLER})"
    measured = {ours: launch(SHIPPED_CONTROLLER, sizes, args.repeats), PEER: launch("torch", sizes, args.repeats)}
    if args.controller and args.controller != SHIPPED_CONTROLLER:
        measured[f"ddl_apps ({args.controller})"] = launch(args.controller, sizes, args.repeats)
    rows = []
    for size in sizes:
        runners = {name: summarise(timings[size], size) for name, timings in measured.items()}
        ratios = {name: round(runners[PEER]["median_ms"] / r["median_ms"], 3) for name, r in runners.items()
                  if name != PEER}
        rows.append({"bytes": size, "runners": runners, "ratio_vs_peer": ratios})
        print(f"{size / 1024:>10,.0f} KB  " + "  ".join(f"{name} {r['median_ms']:.3f} ms" for name, r in
                                                       runners.items()) + f"  ratio {ratios[ours]:.2f}", flush=True)
    write_result("allreduce", {"workers": 2, "repeats": args.repeats, "shipped": ours, "peer": PEER,
                               "settings": {"controller": SHIPPED_CONTROLLER, "cycle_time_ms": shipped.cycle_time_ms},
                               "rows": rows})


if __name__ == "__main__":
    main()
