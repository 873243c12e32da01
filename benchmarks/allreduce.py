"""Allreduce at np=2 on one host: the ddl_apps core (Horovod with the settings the core ships) against
torch.distributed with Gloo, fp32 tensors from 4 KB to 256 MB. Each size is timed `--repeats` times after two
warm-up calls, every call between barriers; the report gives the median, the spread (min-max) and the ratio
torch.distributed / ddl_apps (above 1: the core is faster). Writes benchmarks/results/allreduce.json.

    .venv/bin/python benchmarks/allreduce.py [--repeats 10] [--max-mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "allreduce.json"


def sizes_bytes(max_mb: float) -> list[int]:
    sizes, size = [], 4 * 1024
    while size <= max_mb * 1024 * 1024:
        sizes.append(size)
        size *= 4
    return sizes


def time_calls(allreduce, barrier, size: int, repeats: int) -> list[float]:
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

    from ddl_apps.core import dist
    from ddl_apps.recipe import DistConfig

    dist.init_torch(DistConfig().cycle_time_ms)  # what every recipe gets unless it sets its own

    def barrier():
        hvd.allreduce(torch.zeros(1), name="bench.barrier")

    return {size: time_calls(lambda t: hvd.allreduce(t, op=hvd.Sum, name=f"bench.{t.numel()}"), barrier, size,
                             repeats) for size in sizes}


def torch_worker(sizes: list[int], repeats: int) -> dict[int, list[float]]:
    import torch.distributed as td

    td.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // td.get_world_size()))
    timings = {size: time_calls(lambda t: td.all_reduce(t), td.barrier, size, repeats) for size in sizes}
    td.destroy_process_group()  # else Gloo's threads abort the process at exit
    return timings


def run_worker(kind: str, sizes: list[int], repeats: int) -> None:
    timings = (horovod_worker if kind == "ddl_apps" else torch_worker)(sizes, repeats)
    rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("RANK", "0")))
    if rank == 0:
        print("RESULT " + json.dumps({str(k): v for k, v in timings.items()}), flush=True)


def launch(kind: str, sizes: list[int], repeats: int) -> dict[int, list[float]]:
    worker = [__file__, "--worker", kind, "--repeats", str(repeats), "--sizes", ",".join(map(str, sizes))]
    if kind == "ddl_apps":
        from ddl_apps.core.launch import run_horovod

        result = run_horovod([sys.executable, *worker], 2, "gloo", capture=True, timeout=1800)
    else:  # torchrun runs the script with its own Python
        torchrun = Path(sys.executable).with_name("torchrun")
        result = subprocess.run([str(torchrun), "--nproc_per_node=2", *worker], capture_output=True, text=True,
                                timeout=1800)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"{kind} workers failed:\n{output[-3000:]}")
    line = next(x for x in output.splitlines() if "RESULT " in x)
    return {int(k): v for k, v in json.loads(line.split("RESULT ", 1)[1]).items()}


def summarise(seconds: list[float], size: int) -> dict[str, float]:
    median = statistics.median(seconds)
    return {"median_ms": round(median * 1e3, 3), "min_ms": round(min(seconds) * 1e3, 3),
            "max_ms": round(max(seconds) * 1e3, 3), "algbw_gb_s": round(size / median / 1e9, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-mb", type=float, default=256)
    parser.add_argument("--worker", choices=["ddl_apps", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, [int(s) for s in args.sizes.split(",")], args.repeats)
        return
    sizes = sizes_bytes(args.max_mb)
    measured = {kind: launch(kind, sizes, args.repeats) for kind in ("ddl_apps", "torch")}
    rows = []
    for size in sizes:
        ours, peer = summarise(measured["ddl_apps"][size], size), summarise(measured["torch"][size], size)
        rows.append({"bytes": size, "ddl_apps": ours, "torch_distributed_gloo": peer,
                     "ratio": round(peer["median_ms"] / ours["median_ms"], 3)})
        print(f"{size / 1024:>10,.0f} KB  ddl_apps {ours['median_ms']:>9.3f} ms  torch.distributed "
              f"{peer['median_ms']:>9.3f} ms  ratio {rows[-1]['ratio']:.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"workers": 2, "cpu_count": os.cpu_count(), "repeats": args.repeats,
                                   "torch": torch.__version__, "results": rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
