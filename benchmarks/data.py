"""`ddl bench data` (issue 22): prepared data streamed per worker against the in-memory path, on the fraud recipe;
and (issue 23, benchmarks/media.py) the image and speech recipes from shards of encoded files.

- preparing a source larger than memory: `ddl data prepare` of a Parquet table 1x, 4x and 16x in size (16x: 25
  GiB, resampled from the IEEE-CIS table with noise), the preparing process's peak anonymous memory;
- larger than memory: a prepared fraud table of >= 32 GiB (the prepared IEEE-CIS training split, copied with
  Gaussian noise on the numeric features; written here, deleted after), trained at np=2 for 2,000 steps: each
  worker's peak anonymous memory (RssAnon) and samples/s against the in-memory path on the normal table;
- flat: peak memory and time to the first step at 1x, 4x and 16x the data, and np=2 against np=1;
- input pipeline alone on one core against the training step;
- bytes each worker reads in an epoch, at 2 and 4 workers;
- the same run from a local S3-compatible server (moto), with a cold and a warm chunk cache, against local disk;
- what the chunk-aware order costs in final metrics against a full permutation (two seeds).

    .venv/bin/python benchmarks/data.py [--large-gib 32] [--prepare-gib 25] [--only prepare ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import LAUNCH_ENV, VENV_BIN, read_result, spread, write_result  # noqa: E402

RECIPE = "fraud_mlp"
SCRATCH = Path(os.environ.get("DDL_BENCH_SCRATCH", "/var/tmp/ddl-bench-data"))
TRAIN = ("model.baselines=[]", "optim.batch_size=512", "run.log_every=50", "run.progress=false")


# ---- running ddl and watching its workers ---------------------------------------------------------------------
def worker_pids(run_dir: Path, launcher: int) -> list[int]:
    """The processes of a `ddl train` of `run_dir` that hold a model: its workers (started by mpirun or by Gloo's
    horovodrun), or itself at np=1."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"run.dir={run_dir}".encode() in cmdline and (b"\0OMPI_COMM_WORLD_RANK=" in environ or
                                                         b"\0HOROVOD_RANK=" in environ):
            found.append(int(proc.name))
    return found or [launcher]


def start_ticks(pid: int) -> int | None:
    """When a process started, in clock ticks since boot (/proc/PID/stat field 22): exact to a tick (10 ms), where
    psutil's create_time adds the boot time, rounded to a second."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def rss_anon_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def train(run_dir: Path, *overrides: str, np_: int = 1, env: dict[str, str] | None = None, recipe: str = RECIPE,
          base: tuple[str, ...] = TRAIN) -> dict:
    """Run `ddl train`; its samples/s (the run log's train rows after the first), each worker's peak anonymous
    memory, and the seconds from launch to the first logged step (run.log_every=1 rows) or to the end."""
    command = [str(VENV_BIN / "ddl"), "train", recipe, f"run.dir={run_dir}", *base, *overrides, "-np", str(np_)]
    peaks: dict[int, float] = {}
    worker_ticks: dict[int, int] = {}
    launcher_ticks: list[int | None] = []

    def watch(launcher: int) -> None:
        if not launcher_ticks:
            launcher_ticks.append(start_ticks(launcher))
        for pid in worker_pids(run_dir, launcher):
            peaks[pid] = max(peaks.get(pid, 0.0), rss_anon_mib(pid))
            if pid not in worker_ticks and (ticks := start_ticks(pid)) is not None:
                worker_ticks[pid] = ticks

    started = time.time()
    run_watched(command, env or {}, watch)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    rates = [r["samples_per_s"] for r in train_rows[1:] if "samples_per_s" in r]
    first = train_rows[0]["time"] if train_rows else None
    worker_start = (started + (max(worker_ticks.values()) - launcher_ticks[0]) / os.sysconf("SC_CLK_TCK")
                    if worker_ticks and launcher_ticks and launcher_ticks[0] is not None else None)
    return {"samples_per_s": spread(rates, 1) if rates else None,
            "peak_rss_anon_mib": sorted(round(v) for v in peaks.values() if v)[-2:],
            "first_step_s": round(first - started, 2) if first else None,  # from the launch (launcher included)
            # from the last worker's process start: the workers' own time to the first step
            "worker_first_step_s": round(first - worker_start, 2) if first and worker_start else None,
            "seconds": round(time.time() - started, 1)}


def run_watched(command: list[str], env: dict[str, str], watch: Callable[[int], None]) -> None:
    """Run `command` (its output kept for the error), calling `watch(its pid)` every 0.1 s while it runs; a command
    that fails stops the benchmark, with its output."""
    with subprocess.Popen(command, env={**os.environ, **LAUNCH_ENV, **env}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as job:
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(job.stdout or []), daemon=True)
        reader.start()
        while job.poll() is None:
            watch(job.pid)
            time.sleep(0.1)
        reader.join()
    if job.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{''.join(output)[-3000:]}")


# ---- datasets ------------------------------------------------------------------------------------------------
def prepare_normal() -> Path:
    target = SCRATCH / "normal"
    if not (target / "manifest.json").exists():
        subprocess.run([str(VENV_BIN / "ddl"), "data", "prepare", RECIPE, "-o", str(target)], check=True)
    return target


def scaled_copy(normal: Path, target: Path, copies: int) -> Path:
    """`normal` with its training split `copies` times, each copy's numeric features with N(0, 0.05) noise (the
    features are standardised, so about 5 % of a feature's spread); validation and test as they are."""
    from ddl_apps.data.dataset import PreparedDataset, stamp_verified
    from ddl_apps.data.manifest import MANIFEST
    from ddl_apps.data.shards import SplitWriter

    if (target / MANIFEST).exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    dataset = PreparedDataset(str(normal))
    manifest = dataset.manifest
    train = dataset.split("train").load()
    chunk_rows = manifest.splits["train"][0].chunks[0].rows
    writer = SplitWriter(target, "train", manifest.columns["train"], chunk_rows, chunk_rows * 256)
    rng = np.random.default_rng(0)
    rows = len(train["label"])
    for copy in range(copies):
        for start in range(0, rows, 65536):
            part = {k: v[start : start + 65536] for k, v in train.items()}
            noise = rng.standard_normal(part["numeric"].shape, dtype=np.float32) * np.float32(0.05)
            writer.add({**part, "numeric": part["numeric"] + noise})
        print(f"  copy {copy + 1}/{copies}", flush=True)
    splits = {"train": writer.finish(), **{s: manifest.splits[s] for s in ("valid", "test")}}
    for shard in [*manifest.splits["valid"], *manifest.splits["test"]]:
        shutil.copy(normal / shard.file, target / shard.file)
    (target / MANIFEST).write_text(manifest.model_copy(update={"splits": splits}).to_json())
    stamp_verified(target, {s.file: s for shards in splits.values() for s in shards})
    return target


def size_gib(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.iterdir()) / 2**30, 2)


# ---- the parts -----------------------------------------------------------------------------------------------
def larger_than_memory(normal: Path, gib: float, scratch: Path) -> dict:
    copies = math.ceil(gib * 2**30 / sum(s.bytes for s in _manifest(normal).splits["train"]))
    started = time.perf_counter()
    large = scaled_copy(normal, SCRATCH / f"large-{copies}x", copies)
    written = time.perf_counter() - started
    streamed, in_memory = [], []
    for turn in range(2):  # in turns, so that a slow spell of the machine does not fall on one side only
        streamed.append(train(scratch / f"large-{turn}", f"data.prepared={large}", "run.max_steps=2000",
                              "optim.epochs=1", np_=2))
        in_memory.append(train(scratch / f"in-memory-{turn}", f"data.prepared={normal}", "data.stream=false",
                               "optim.epochs=3", np_=2))  # 1,209 steps: the whole recipe
    rates = {side: statistics.median(r["samples_per_s"]["median"] for r in runs)
             for side, runs in (("streamed", streamed), ("in_memory", in_memory))}
    result = {"dataset_gib": size_gib(large), "train_rows": _manifest(large).rows("train"), "copies": copies,
              "write_seconds": round(written, 1), "streamed": streamed[-1], "in_memory_normal_table": in_memory[-1],
              "streamed_runs": [r["samples_per_s"]["median"] for r in streamed],
              "in_memory_runs": [r["samples_per_s"]["median"] for r in in_memory],
              "peak_rss_anon_mib": max(max(r["peak_rss_anon_mib"]) for r in streamed),
              "throughput_ratio": round(rates["streamed"] / rates["in_memory"], 3)}
    shutil.rmtree(large)
    return result


def flat(normal: Path, scratch: Path) -> dict:
    rows = {}
    for copies in (1, 4, 16):
        data = normal if copies == 1 else scaled_copy(normal, SCRATCH / f"scaled-{copies}x", copies)
        first = ("run.max_steps=200", "run.log_every=1")
        rows[f"{copies}x"] = {"dataset_gib": size_gib(data),
                              "np2": train(scratch / f"flat-{copies}x-np2", f"data.prepared={data}", *first, np_=2),
                              "np1": train(scratch / f"flat-{copies}x-np1", f"data.prepared={data}", *first, np_=1)}
        if copies > 1:
            shutil.rmtree(data)
    base = rows["1x"]["np2"]
    for row in rows.values():
        row["memory_ratio"] = round(max(row["np2"]["peak_rss_anon_mib"]) / max(base["peak_rss_anon_mib"]), 3)
        row["first_step_ratio"] = round(row["np2"]["worker_first_step_s"] / base["worker_first_step_s"], 3)
        row["np2_vs_np1_first_step"] = round(row["np2"]["worker_first_step_s"] / row["np1"]["worker_first_step_s"], 3)
    return rows


PREPARE_SIZES = (1, 4, 16)
SOURCE_ROW_GROUP = 500_000


def peak_anon_of(command: list[str]) -> tuple[float, float]:
    """Run `command`; its peak anonymous memory (MiB, sampled every 0.1 s) and its seconds."""
    started, peak = time.time(), [0.0]
    run_watched(command, {}, lambda pid: peak.append(max(peak.pop(), rss_anon_mib(pid))))
    return peak[0], time.time() - started


def resampled_source(target: Path, rows: int) -> dict:
    """A Parquet table of `rows` rows drawn at random from the IEEE-CIS table (its label, id and numeric
    columns, missing values as 0), each number with N(0, 0.05 x the column's std) noise, written a row group at a
    time. (No missing values, so no missing-value indicators: the prepared data is about the source's size, where
    IEEE-CIS's own gaps make it twice that, which a disk has to hold beside a source larger than memory.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ddl_apps.recipe import load_recipe
    from ddl_apps.trainers.tabular import data as tabular

    cfg = load_recipe(RECIPE).data
    overrides = [f"data.source={target}", "data.time_column=null", "data.categorical=[]"]
    with suppress(OSError, pa.ArrowException):  # a whole source a stopped run left (its footer is written last)
        metadata = pq.read_metadata(target)
        if metadata.num_rows == rows:
            return {"rows": rows, "columns": metadata.num_columns, "gib": round(target.stat().st_size / 2**30, 2),
                    "overrides": overrides}
    table = pq.read_table(tabular.source_file(cfg.source))
    numeric = [f.name for f in table.schema if pa.types.is_floating(f.type) and f.name not in cfg.categorical]
    values = np.nan_to_num(np.column_stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float32)
                                            for c in numeric]))
    noise = values.std(axis=0) * np.float32(0.05)
    label = table.column(cfg.label).to_numpy()
    rng = np.random.default_rng(0)
    schema = pa.schema([(cfg.id_column, pa.int64()), (cfg.label, pa.int64()),
                        *((c, pa.float32()) for c in numeric)])
    with pq.ParquetWriter(target, schema) as writer:
        for start in range(0, rows, SOURCE_ROW_GROUP):
            n = min(SOURCE_ROW_GROUP, rows - start)
            drawn = rng.integers(len(label), size=n)
            x = values[drawn] + rng.standard_normal((n, len(numeric)), dtype=np.float32) * noise
            writer.write_table(pa.table([np.arange(start, start + n), label[drawn], *x.T], schema=schema))
    return {"rows": rows, "columns": len(numeric) + 2, "gib": round(target.stat().st_size / 2**30, 2),
            "overrides": overrides}


def prepared_at_scale(scratch: Path, largest_gib: float) -> dict:
    """`ddl data prepare` itself of a source 1x, 4x and 16x in size, the largest `largest_gib` (larger than this
    machine's memory): the preparing process's peak anonymous memory against the source's size."""
    row_bytes = 541  # what a row of resampled_source takes in Parquet (measured: 32.54 GiB for 64.5 M rows)
    base_rows = math.ceil(largest_gib * 2**30 / PREPARE_SIZES[-1] / row_bytes)
    rows = {}
    for factor in PREPARE_SIZES:
        source = SCRATCH / f"source-{factor}x.parquet"
        started = time.perf_counter()
        made = resampled_source(source, base_rows * factor)  # (or the one a stopped run left, if whole)
        target = scratch / f"prepared-{factor}x"
        peak, seconds = peak_anon_of([str(VENV_BIN / "ddl"), "data", "prepare", RECIPE, *made.pop("overrides"),
                                      "-o", str(target)])
        rows[f"{factor}x"] = {"source": made, "written_seconds": round(time.perf_counter() - started - seconds, 1),
                              "prepare_seconds": round(seconds, 1), "peak_rss_anon_mib": round(peak),
                              "prepared_gib": size_gib(target)}
        print(f"  {factor}x: {rows[f'{factor}x']}", flush=True)
        source.unlink()
        shutil.rmtree(target)
    for row in rows.values():
        row["memory_ratio"] = round(row["peak_rss_anon_mib"] / rows["1x"]["peak_rss_anon_mib"], 3)
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"sizes": rows, "machine_memory_gib": round(memory_gib, 1),
            "largest_source_over_memory": round(rows[f"{PREPARE_SIZES[-1]}x"]["source"]["gib"] / memory_gib, 2)}


STEP_RUNS = {  # each recipe's training step, its data in memory (np=1): overrides and steps
    RECIPE: ((*TRAIN, "optim.epochs=3"), 400),
    "recsys_neumf": (("run.log_every=50", "run.progress=false", "model.baseline=false"), 600),
    "nlp_minilm": (("run.log_every=5", "run.progress=false", "model.baseline=false"), 40),
}


def input_pipeline(scratch: Path) -> dict:
    """Per recipe of issue 22: one worker's training stream (np=1, the recipe's batch, negatives drawn and
    tensors made) in this process pinned to one core, against the training step's samples/s."""
    rows = {}
    for recipe, (overrides, steps) in STEP_RUNS.items():
        step = train(scratch / f"step-{recipe}", "data.stream=false", f"run.max_steps={steps}", recipe=recipe,
                     base=overrides)["samples_per_s"]["median"]
        pipeline = spread(stream_rates(recipe, overrides), 1)
        rows[recipe] = {"pipeline_one_core_samples_per_s": pipeline, "training_step_samples_per_s": step,
                        "ratio": round(pipeline["median"] / step, 2)}
    return rows


def built_task(recipe: str, overrides: list[str]):
    """The recipe's config and task as one worker of one builds them (its training source ready to stream)."""
    from ddl_apps.core.dist import Topology
    from ddl_apps.recipe import load_recipe
    from ddl_apps.registry import load_trainer

    config = load_recipe(recipe, overrides)
    return config, load_trainer(config.trainer).load_hooks().build_task(config, Topology(0, 1, 0, 1))


@contextmanager
def one_core() -> Iterator[None]:
    """This process pinned to one core, torch (and TensorFlow, once imported) on one thread."""
    import torch

    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    if "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
        with suppress(RuntimeError):  # (already set)
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
    try:
        yield
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def stream_rates(recipe: str, overrides: tuple[str, ...], seconds: float = 20.0) -> list[float]:
    config, task = built_task(recipe, [o for o in overrides if not o.startswith("run.")])
    rates, epoch = [], 0
    with one_core():
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started, samples = time.perf_counter(), 0
            for micro_batches in task.train.rank_steps(epoch, 0, config.optim.batch_size, 0, 1, 1):
                samples += sum(len(next(iter(b.values()))) for b in micro_batches)
                if time.perf_counter() - started > seconds / 4:
                    break
            rates.append(samples / (time.perf_counter() - started))
            epoch += 1
    return rates


def bytes_per_worker(normal: Path) -> dict:
    """Bytes each worker reads from storage in one epoch (global batch 1024), as a share of the training split."""
    from ddl_apps.data.dataset import PreparedDataset, StreamedSplit

    total = sum(s.bytes for s in _manifest(normal).splits["train"])
    rows = {}
    for workers in (2, 4):
        shares = []
        for rank in range(workers):
            stream = StreamedSplit(PreparedDataset(str(normal)).split("train"), 0, lambda c: c)
            for _ in stream.rank_steps(0, 0, 1024, rank, workers, 1):
                pass
            shares.append(stream.reader.dataset.store.bytes_read / total)
        rows[f"np{workers}"] = {"largest_share": round(max(shares), 4), "times_1_over_n": round(max(shares) * workers,
                                                                                                 3)}
    return rows


def object_storage(normal: Path, scratch: Path) -> dict:
    """The normal table uploaded to a moto S3 server on the loopback address; np=2, 600 steps, from local disk,
    then from S3 with an empty chunk cache, then again with the cache warm."""
    import fsspec

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.data.s3_server import s3_server

    steps = ("run.max_steps=600", "optim.epochs=2")
    local = train(scratch / "s3-local", f"data.prepared={normal}", *steps, np_=2)
    with s3_server("bench") as aws:
        fs = fsspec.filesystem("s3", key=aws["AWS_ACCESS_KEY_ID"], secret=aws["AWS_SECRET_ACCESS_KEY"],
                               endpoint_url=aws["AWS_ENDPOINT_URL"], skip_instance_cache=True)
        for path in sorted(normal.iterdir()):
            fs.put_file(str(path), f"bench/fraud/{path.name}")
        env = {**aws, "DDL_CACHE": str(scratch / "s3-cache")}
        server = server_cpu_seconds()
        cold = train(scratch / "s3-cold", "data.prepared=s3://bench/fraud", *steps, np_=2, env=env)
        cold["server_cpu_s"] = round(server_cpu_seconds() - server, 1)  # what serving the GETs cost the 2 cores
        warm = train(scratch / "s3-warm", "data.prepared=s3://bench/fraud", *steps, np_=2, env=env)
    base = local["samples_per_s"]["median"]
    return {"local": local, "s3_cold_cache": cold, "s3_warm_cache": warm,
            "cold_ratio": round(cold["samples_per_s"]["median"] / base, 3),
            "warm_ratio": round(warm["samples_per_s"]["median"] / base, 3)}


def server_cpu_seconds() -> float:
    """CPU seconds the moto server has used so far (it runs on the same 2 cores as the workers)."""
    for proc in Path("/proc").iterdir():
        try:
            if b"moto.server" in (proc / "cmdline").read_bytes():
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, IndexError, ValueError):
            continue
    return 0.0


def order_cost(scratch: Path) -> dict:
    """The recipe as shipped (3 epochs, np=1) on the whole table, chunk-aware order against a full permutation (both
    loaded into memory: a full permutation reads every chunk at every step)."""
    rows = {}
    for seed in (0, 1):
        for order in ("chunks", "full"):
            run = scratch / f"order-{order}-{seed}"
            train(run, f"run.seed={seed}", f"data.shuffle={order}", "data.stream=false")
            test = json.loads((run / "summary.json").read_text())["results"]["model (test)"]
            rows[f"{order}, seed {seed}"] = {k: round(test[k], 4) for k in ("pr_auc", "roc_auc", "recall_at_1pct_fpr")}
    return rows


def _manifest(folder: Path):
    from ddl_apps.data.manifest import MANIFEST, Manifest

    return Manifest.parse((folder / MANIFEST).read_bytes(), str(folder))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large-gib", type=float, default=32.0)
    parser.add_argument("--prepare-gib", type=float, default=25.0,
                        help="the largest source `ddl data prepare` reads (16x): larger than this machine's memory "
                        "(24 GiB); it needs about twice that in free disk")
    parser.add_argument("--only", nargs="+", help="measure only these parts, keeping the others' last results")
    args = parser.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    normal = prepare_normal()
    earlier = read_result("data") if args.only else None
    result: dict = {k: v for k, v in (earlier or {}).items() if k != "machine"}
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        scratch = Path(tmp)
        parts = {
            "bytes_per_worker": lambda: bytes_per_worker(normal),
            "input": lambda: input_pipeline(scratch),
            "flat": lambda: flat(normal, scratch),
            "object_storage": lambda: object_storage(normal, scratch),
            "order": lambda: order_cost(scratch),
            "larger_than_memory": lambda: larger_than_memory(normal, args.large_gib, scratch),
            "prepare": lambda: prepared_at_scale(scratch, args.prepare_gib),
            "images": lambda: media.images(scratch),
            "speech": lambda: media.speech(scratch),
        }
        from benchmarks import media  # (it imports this module)

        for name, part in parts.items():
            if args.only and name not in args.only:
                continue
            print(f"-- {name}", flush=True)
            result[name] = part()
            write_result("data", result)  # what is measured so far survives a failure further on

if __name__ == "__main__":
    main()
