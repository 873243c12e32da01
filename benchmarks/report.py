"""BENCHMARKS.md and its charts (benchmarks/charts/*.png) from the JSON results in benchmarks/results/.

    .venv/bin/python benchmarks/report.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, read_result  # noqa: E402

CHARTS = REPO / "benchmarks" / "charts"
OUT = REPO / "BENCHMARKS.md"
TARGETS = {"allreduce": 1.0, "scaling": 0.90, "overhead": 1.03, "peer": 1.0}

INTRO = """# Benchmarks

Regenerate everything here with `make bench` (or `ddl bench`; `ddl bench allreduce` for one part): each part
writes `benchmarks/results/<part>.json`, then this file and `benchmarks/charts/` are rebuilt from those results.
Every figure is a median over repeated measurements (calls, or log windows of several steps after a warm-up
window); brackets give the spread (min-max). Ratios compare against a peer measured in the same `make bench`.
The `fraud_mlp` figures below were measured while that recipe trained a single MLP; since issue 24 it trains an
8-member TabM-mini ensemble (about 6x the compute per step), which the next `make bench` measures.

## What the core ships, and why
Measured on the machine below before these settings (Horovod 0.28.1 as released, Gloo controller, 5 ms cycle):
a 4 KB allreduce took 5-7 ms against 0.7 ms for torch.distributed, 64 MB 168 ms against 74 ms.
- **No cycle wait** (build patch `0003`): Horovod's background thread slept out `HOROVOD_CYCLE_TIME` before
  every negotiation, so every collective waited up to a cycle; now a queued tensor wakes it, and rounds run back
  to back while tensors are in flight (the cycle time only paces idle rounds).
- **No spinning wait** (build patch `0004`): `hvd.synchronize` (behind every blocking PyTorch collective and
  `DistributedOptimizer.step`) polled in a `yield` loop, keeping a core busy; it now sleeps on a condition variable.
- **MPI on one host** (`dist.controller: auto`): Open MPI's shared-memory transport; Gloo's TCP loopback needs
  several thread wake-ups per message, which on a loaded host wait for a time slice. Gloo stays the controller
  across hosts and for `--elastic`. `OMPI_MCA_mpi_yield_when_idle=1`: Open MPI busy-polls while it waits for the
  other ranks; with as many workers as cores that polling took the CPU from the compute threads.
- **One fused gradient allreduce per step** (`dist.gradient_groups: 1`): Horovod's default allreduces each
  gradient as it is ready, one negotiation round each; one group is one round and one fusion buffer.
- In-place allreduce (`hvd.allreduce_`, as the optimizer uses and as `torch.distributed.all_reduce` is): the
  out-of-place call allocates its output each time, and on this machine a fresh 64 MB costs ~0.25 s of page faults.
"""


def fmt(x: float) -> str:
    return f"{x:,.3f}" if x < 10 else f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def with_spread(s: dict) -> str:
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "**missed**"


def machine_line(result: dict) -> str:
    m = result["machine"]
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, torch "
            f"{m['torch']}, TensorFlow {m['tensorflow']}, Horovod {m['horovod']}; measured {m['date']}.")


def bar_chart(name: str, labels: list[str], values: list[float], target: float, ylabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(labels, values, color="#4878a8")
    ax.axhline(target, color="#c44e52", linestyle="--", label=f"target {target}")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    ax.set_ylabel(ylabel)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save(fig, name)


def save(fig, name: str) -> str:
    import matplotlib.pyplot as plt

    CHARTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(CHARTS / f"{name}.png", dpi=110)
    plt.close(fig)
    return f"![{name}](benchmarks/charts/{name}.png)"


def allreduce_section(result: dict) -> tuple[list[str], list[tuple]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, ours = result["rows"], result["shipped"]
    runners = list(rows[0]["runners"])
    lines = ["## 1. Allreduce, np=2, fp32", machine_line(result),
             f"Shipped: {ours} with a {result['settings']['cycle_time_ms']} ms idle cycle; "
             f"{result['repeats']} timed calls per size, each between barriers.", "",
             "| size | " + " | ".join(f"{r} ms" for r in runners) + f" | {ours} GB/s | ratio (peer / ours) |",
             "|---" * (len(runners) + 3) + "|"]
    for row in rows:
        cells = [f"{fmt(r['median_ms'])} ({fmt(r['min_ms'])}-{fmt(r['max_ms'])})" for r in row["runners"].values()]
        lines.append(f"| {row['bytes'] / 1024:,.0f} KB | " + " | ".join(cells) +
                     f" | {row['runners'][ours]['algbw_gb_s']} | {row['ratio_vs_peer'][ours]:.2f} |")
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    sizes = [row["bytes"] / 1024 for row in rows]
    for runner in runners:
        ax.loglog(sizes, [row["runners"][runner]["median_ms"] for row in rows], marker="o", label=runner)
    ax.set_xlabel("tensor size (KB)")
    ax.set_ylabel("latency (ms, median)")
    ax.legend()
    fig.tight_layout()
    lines += ["", save(fig, "allreduce"), ""]
    from_64k = [row for row in rows if row["bytes"] >= 64 * 1024]
    worst = min(from_64k, key=lambda row: row["ratio_vs_peer"][ours])
    summary = ("allreduce vs torch.distributed, 64 KB-256 MB", f">= {TARGETS['allreduce']}x",
               f"{worst['ratio_vs_peer'][ours]:.2f}x at worst ({worst['bytes'] / 1024:,.0f} KB)",
               verdict(worst["ratio_vs_peer"][ours], TARGETS["allreduce"]))
    return lines, [summary]


def scaling_section(result: dict) -> tuple[list[str], list[tuple]]:
    lines = ["## 2. Scaling, np=1 -> np=2, one core per worker", machine_line(result),
             "Training samples/s of `ddl train RECIPE` (log windows after the first), each job on exactly np cores "
             "(`taskset`) with one compute thread per worker; efficiency = np2 / (2 x np1). Beside: np=1 with the "
             "second core idle (its helper threads run there for free) and the efficiency against that. Step time: "
             "global batch / samples/s. From a Horovod timeline of another np=2 run, per step (mean): its step time "
             "(writing the timeline slows it), the collectives' execution (fusion-buffer copies and the MPI "
             "operation) and their negotiation (waiting until both workers have submitted).", "",
             "| recipe | np=1 samples/s | np=2 samples/s | efficiency | np=1, spare core | efficiency vs it "
             "| step ms np=1 | step ms np=2 | timeline: step ms | collectives ms | negotiation ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    summaries = []
    for row in result["rows"]:
        tl = row["timeline_np2"]
        lines.append(f"| {row['recipe']} | {with_spread(row['np1_samples_per_s'])} | "
                     f"{with_spread(row['np2_samples_per_s'])} | {row['efficiency']:.3f} | "
                     f"{with_spread(row['np1_spare_core_samples_per_s'])} | {row['efficiency_vs_spare_core']:.3f} | "
                     f"{row['step_ms_np1']} | {row['step_ms_np2']} | {tl['step_ms']} | {tl['collectives_ms']} | "
                     f"{tl['negotiation_ms']} |")
        summaries.append((f"scaling efficiency, {row['recipe']}", f">= {TARGETS['scaling']}",
                          f"{row['efficiency']:.3f}", verdict(row["efficiency"], TARGETS["scaling"])))
    chart = bar_chart("scaling", [r["recipe"] for r in result["rows"]], [r["efficiency"] for r in result["rows"]],
                      TARGETS["scaling"], "scaling efficiency")
    return lines + ["", chart, "", *autotune_lines(result.get("autotune"))], summaries


def autotune_lines(tuned: dict | None) -> list[str]:
    if not tuned:
        return []
    best = tuned["best"]
    found = ", ".join(f"{k} {v}" for k, v in best.items() if k != "score") if best else "none"
    state = "its search ended on" if tuned["finished"] else "its search had not ended; the best-scored sample so far:"
    return [f"Horovod's autotuner (`HOROVOD_AUTOTUNE=1`) on `{tuned['recipe']}` at np=2, {tuned['steps']:,} steps: "
            f"{tuned['samples_scored']} samples scored; {state} {found}. Samples/s over the last third of the run: "
            f"{tuned['tuned_samples_per_s']:,} tuned against {tuned['shipped_samples_per_s']:,} with the shipped "
            "settings.", ""]


def comparison_section(name: str, result: dict, title: str, intro: str, columns: tuple[str, str, str],
                       ratio: tuple[str, str], higher_is_better: bool) -> tuple[list[str], list[tuple]]:
    """A table of ours vs a peer per recipe (`columns`: result keys of our samples/s and the peer's, and the peer's
    header), its chart, and one target line per recipe (`ratio`: result key and how the target table names it)."""
    ours_key, peer_key, peer_header = columns
    ratio_key, ratio_name = ratio
    target = TARGETS[name]
    lines = [title, machine_line(result), intro, "",
             f"| recipe | ddl_apps samples/s | {peer_header} samples/s | ratio |", "|---|---|---|---|"]
    summaries = []
    for row in result["rows"]:
        lines.append(f"| {row['recipe']} | {with_spread(row[ours_key])} | {with_spread(row[peer_key])} | "
                     f"{row[ratio_key]:.3f} |")
        summaries.append((f"{ratio_name}, {row['recipe']}", f"{'>=' if higher_is_better else '<='} {target}x",
                          f"{row[ratio_key]:.3f}x", verdict(row[ratio_key], target, higher_is_better)))
    chart = bar_chart(name, [r["recipe"] for r in result["rows"]], [r[ratio_key] for r in result["rows"]], target,
                      ratio_name)
    return lines + ["", chart, ""], summaries


def overhead_section(result: dict) -> tuple[list[str], list[tuple]]:
    return comparison_section(
        "overhead", result, "## 3. Engine overhead vs a hand-written Horovod loop, np=2",
        "Same model, data and global batches, in one job, taking turns; ratio = engine step time / hand-written "
        "step time (below 1: the engine is faster).",
        ("engine_samples_per_s", "hand_samples_per_s", "hand-written"), ("step_time_ratio", "engine overhead"),
        higher_is_better=False)


def peer_section(result: dict) -> tuple[list[str], list[tuple]]:
    return comparison_section(
        "peer", result, "## 4. Peer: torch.distributed DDP (torchrun, Gloo) vs the ddl_apps engine, np=2",
        "DDP runs a plain loop (DDP-wrapped model, the recipe's optimizer and clipping) on the same model, data and "
        "batches; one thread per worker on both sides; ratio = our samples/s / DDP's.",
        ("ddl_apps_samples_per_s", "ddp_samples_per_s", "DDP"), ("throughput_ratio", "throughput vs DDP"),
        higher_is_better=True)


def target_row(name: str, target: str, value: float, limit: float, higher_is_better: bool, unit: str = "x"):
    return (name, target, f"{value:,.3f}{unit}" if unit == "x" else f"{value:,.0f} {unit}",
            verdict(value, limit, higher_is_better))


def data_section(result: dict) -> tuple[list[str], list[tuple]]:
    """Issue 22: the fraud recipe prepared once and streamed by each worker."""
    lines = ["## 5. Prepared data: the fraud recipe streamed per worker", machine_line(result),
             "Prepared once (`ddl data prepare`); np=2 unless said; peak memory is each worker's RssAnon (anonymous "
             "memory, not page cache), sampled every 0.1 s.", ""]
    summaries = []
    if "larger_than_memory" in result:
        large = result["larger_than_memory"]
        streamed, memory = large["streamed"], large["in_memory_normal_table"]
        lines += [f"**Larger than memory**: {large['dataset_gib']} GiB prepared ({large['train_rows']:,} training "
                  f"rows: the prepared IEEE-CIS training split {large['copies']} times, each copy's features with "
                  f"N(0, 0.05) noise; written in {large['write_seconds']:.0f} s), 2,000 steps of 2 x 512, against "
                  "the in-memory path on the normal table (the whole recipe, 1,209 steps), two runs each in turns "
                  f"(medians {', '.join(fmt(r) for r in large.get('streamed_runs', []))} streamed; "
                  f"{', '.join(fmt(r) for r in large.get('in_memory_runs', []))} in memory); the table shows the "
                  "last of each:", "",
                  "| | samples/s | peak RssAnon per worker (MiB) |", "|---|---|---|",
                  f"| streamed from the large table | {with_spread(streamed['samples_per_s'])} | "
                  f"{', '.join(map(str, streamed['peak_rss_anon_mib']))} |",
                  f"| in memory, normal table (`data.stream=false`) | {with_spread(memory['samples_per_s'])} | "
                  f"{', '.join(map(str, memory['peak_rss_anon_mib']))} |", ""]
        summaries += [target_row("data: peak memory per worker, >= 32 GiB table", "<= 2,048 MiB",
                                 large.get("peak_rss_anon_mib", max(streamed["peak_rss_anon_mib"])), 2048, False,
                                 "MiB"),
                      target_row("data: samples/s streamed (large) / in memory (normal)", ">= 0.9x",
                                 large["throughput_ratio"], 0.9, True)]
    if "prepare" in result:
        prepared = result["prepare"]
        lines += ["**Preparing a source larger than memory** (`ddl data prepare` of a Parquet table resampled from the "
                  "IEEE-CIS table with noise, no time column, no categories; the preparing process's peak RssAnon; "
                  f"this machine has {prepared['machine_memory_gib']} GiB, the largest source is "
                  f"{prepared['largest_source_over_memory']:.2f}x that):", "",
                  "| source | rows | GiB | prepared GiB | seconds | peak RssAnon (MiB) | vs 1x |",
                  "|---|---|---|---|---|---|---|"]
        for size, row in prepared["sizes"].items():
            lines.append(f"| {size} | {row['source']['rows']:,} | {row['source']['gib']} | {row['prepared_gib']} | "
                         f"{row['prepare_seconds']:.0f} | {row['peak_rss_anon_mib']:,} | {row['memory_ratio']:.3f} |")
        largest = list(prepared["sizes"].values())[-1]
        summaries += [target_row("data: prepare peak memory, source larger than memory", "<= 2,048 MiB",
                                 largest["peak_rss_anon_mib"], 2048, False, "MiB"),
                      target_row("data: prepare peak memory at 16x / 1x the source", "<= 1.2x",
                                 largest["memory_ratio"], 1.2, False)]
        lines.append("")
    if "flat" in result:
        lines += ["**Flat** in the size of the data (200 steps, `run.log_every=1`; first step: seconds from the "
                  "workers' process start to the first step's log line, and in brackets from `ddl train`'s launch, "
                  "the launcher's start-up included):", "",
                  "| data | GiB | peak RssAnon np=2 (MiB) | memory vs 1x | first step np=2 (s) | vs 1x | np=1 (s) | "
                  "np=2 / np=1 |", "|---|---|---|---|---|---|---|---|"]
        for size, row in result["flat"].items():
            np2, np1 = row["np2"], row["np1"]
            lines.append(f"| {size} | {row['dataset_gib']} | {', '.join(map(str, np2['peak_rss_anon_mib']))} | "
                         f"{row['memory_ratio']:.3f} | {np2['worker_first_step_s']} ({np2['first_step_s']}) | "
                         f"{row['first_step_ratio']:.3f} | {np1['worker_first_step_s']} ({np1['first_step_s']}) | "
                         f"{row['np2_vs_np1_first_step']:.3f} |")
        rows = result["flat"]
        summaries += [target_row("data: peak memory at 16x / 1x the data", "<= 1.2x", rows["16x"]["memory_ratio"],
                                 1.2, False),
                      target_row("data: time to first step at 16x / 1x", "<= 1.2x", rows["16x"]["first_step_ratio"],
                                 1.2, False),
                      target_row("data: time to first step np=2 / np=1 (1x)", "<= 1.1x",
                                 rows["1x"]["np2_vs_np1_first_step"], 1.1, False)]
        lines.append("")
    if "input" in result:
        lines += ["**Input pipeline alone on one core** (one worker's stream at the recipe's batch, negatives drawn "
                  "and tensors made, no model) against the training step (np=1, data in memory):", "",
                  "| recipe | input pipeline, 1 core (samples/s) | training step (samples/s) | ratio |",
                  "|---|---|---|---|"]
        for recipe, i in result["input"].items():
            lines.append(f"| {recipe} | {with_spread(i['pipeline_one_core_samples_per_s'])} | "
                         f"{fmt(i['training_step_samples_per_s'])} | {i['ratio']:.2f} |")
            summaries.append(target_row(f"data: input pipeline on one core / training step, {recipe}", ">= 3x",
                                        i["ratio"], 3, True))
        lines.append("")
    if "bytes_per_worker" in result:
        b = result["bytes_per_worker"]
        lines += ["**Bytes read per worker in an epoch** (global batch 1,024): "
                  + "; ".join(f"{k}: {v['largest_share']:.4f} of the training split ({v['times_1_over_n']:.3f}/N)"
                              for k, v in b.items()) + ".", ""]
        summaries.append(target_row("data: bytes per worker per epoch, x 1/N (np=4)", "<= 1.2",
                                    b["np4"]["times_1_over_n"], 1.2, False))
    if "object_storage" in result:
        o = result["object_storage"]
        lines += ["**Object storage** (a moto S3 server on the loopback address, the normal table, 600 steps; the "
                  f"server is Python and runs on the same 2 cores as the workers: it used "
                  f"{o['s3_cold_cache'].get('server_cpu_s', '?')} CPU-seconds serving the cold run, which took "
                  f"{o['s3_cold_cache'].get('seconds', '?')} s):", "",
                  "| from | samples/s | vs local disk |", "|---|---|---|",
                  f"| local disk | {with_spread(o['local']['samples_per_s'])} | 1 |",
                  f"| S3, empty chunk cache | {with_spread(o['s3_cold_cache']['samples_per_s'])} | "
                  f"{o['cold_ratio']:.3f} |",
                  f"| S3, warm chunk cache | {with_spread(o['s3_warm_cache']['samples_per_s'])} | "
                  f"{o['warm_ratio']:.3f} |",
                  ""]
        summaries += [target_row("data: S3 / local disk, cold cache", ">= 0.8x", o["cold_ratio"], 0.8, True),
                      target_row("data: S3 / local disk, warm cache", ">= 0.95x", o["warm_ratio"], 0.95, True)]
    if "order" in result:
        lines += ["**What the chunk-aware order costs** (the recipe as shipped, 3 epochs, np=1, test split; "
                  "`data.shuffle=chunks` is the default, `full` a full permutation):", "",
                  "| order, seed | PR-AUC | ROC-AUC | recall at 1 % FPR |", "|---|---|---|---|",
                  *[f"| {k} | {v['pr_auc']:.4f} | {v['roc_auc']:.4f} | {v['recall_at_1pct_fpr']:.4f} |"
                    for k, v in result["order"].items()], ""]
    for kind in ("images", "speech"):
        if kind in result:
            more_lines, more_summaries = media_lines(kind, result[kind])
            lines += more_lines
            summaries += more_summaries
    return lines, summaries


MEDIA = {"images": ("image_resnet", "generated digit files (PNG, one in five JPEG, 24-40 px), 1x = 10,000 files"),
         "speech": ("asr_conformer", "an espeak-ng corpus, 1x = its first tenth")}


def media_lines(kind: str, r: dict) -> tuple[list[str], list[tuple]]:
    """Issue 23: a recipe of encoded files (images, audio) prepared into shards and streamed."""
    recipe, what = MEDIA[kind]
    lines = [f"**{kind.capitalize()} from shards of encoded files** (`{recipe}`; {what}"
             + (f"; {r['hours']} hours at 10x" if "hours" in r else "") + "): prepared once, trained np=2 and np=1 "
             "(first step: seconds from the last worker's start):", "",
             "| data | training files | prepare (s) | shards (GiB) | peak RssAnon np=2 (MiB) | first step np=2 (s) | "
             "np=1 (s) | np=2 / np=1 |", "|---|---|---|---|---|---|---|---|"]
    flat = r["flat"]
    for size, runs in flat["runs"].items():
        prepared = r["prepare"][size]
        lines.append(f"| {size} | {prepared['train_rows']:,} | {prepared['seconds']} | {prepared['gib']} | "
                     f"{', '.join(map(str, runs['np2']['peak_rss_anon_mib']))} | "
                     f"{runs['np2']['worker_first_step_s']} | {runs['np1']['worker_first_step_s']} | "
                     f"{flat['first_step_np2_vs_np1'][size]:.3f} |")
    largest = list(flat["runs"])[-1]
    i, shipped = r["input"], r["shipped"]
    stages = "; ".join(f"{stage.replace('_', ' ')}: {fmt(v['median'])}"
                       for stage, v in i["pipeline_one_core_samples_per_s"].items())
    lines += ["", f"Input pipeline alone on one core, samples/s ({stages}) against the training step "
              f"({fmt(i['training_step_samples_per_s'])} samples/s, np=1, data in memory): {i['ratio']:.2f}x. "
              f"Training from the shipped data's shards: {', '.join(map(fmt, shipped['shards_samples_per_s']))} "
              f"samples/s, against {', '.join(map(fmt, shipped['in_memory_samples_per_s']))} in memory "
              f"(np=1, in turns): {shipped['ratio']:.3f}x.", ""]
    summaries = [target_row(f"{kind}: peak memory per worker, 10x / 1x the files", "<= 1.2x", flat["memory_ratio"],
                            1.2, False),
                 target_row(f"{kind}: time to first step np=2 / np=1 ({largest})", "<= 1.1x",
                            flat["first_step_np2_vs_np1"][largest], 1.1, False),
                 target_row(f"{kind}: input pipeline on one core / training step", ">= 3x", i["ratio"], 3, True),
                 target_row(f"{kind}: samples/s from shards / in memory (shipped data)", ">= 0.95x", shipped["ratio"],
                            0.95, True)]
    return lines, summaries


def hosts_section(result: dict) -> tuple[list[str], list[tuple]]:
    """What a slow host costs (no target: the issue asks for the figure)."""
    even = result["even_samples_per_s"]
    lines = ["## 6. A slow host: two hosts, one of them throttled", machine_line(result),
             f"Training samples/s of `{result['recipe']}` on two hosts (network namespaces on this machine, an SSH "
             "server each), one worker and one compute thread per host, launched with `ddl train --hostfile`; then "
             "the second host's CPU time capped by a cgroup CPU quota (100 ms periods, as a container's CPU limit). "
             f"{result['runs']} runs of each, taking turns. Every step waits for both workers, so the run goes at "
             "the slow host's pace: the weights are those of even hosts (tests/launch/test_multihost.py), the "
             "throughput is about the slow host's share of a core.", "",
             "| second host | samples/s | ratio to even hosts | ratio / the host's share of a core |",
             "|---|---|---|---|", f"| a whole core (even hosts) | {with_spread(even)} | 1.000 | 1.000 |"]
    for row in result["rows"]:
        cores = row["slow_host_cores"]
        lines.append(f"| {cores} of a core | {with_spread(row['samples_per_s'])} | {row['ratio']:.3f} | "
                     f"{row['ratio'] / cores:.2f} |")
    return lines + [""], []


def mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def zero_memory_lines(rows: list[dict]) -> list[str]:
    lines = ["| workers | stage | parameters MiB | gradients MiB | optimizer state MiB | total MiB | the paper's total "
             "MiB |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        held, formula = row["held"], row["formula"]
        parts = ("parameters", "gradients", "optimizer_state")
        lines.append(f"| {row['workers']} | {row['stage']} | " + " | ".join(
            f"{mib(held[p])} ({mib(formula[p])})" for p in parts) +
            f" | {mib(sum(held[p] for p in parts))} | {mib(sum(formula[p] for p in parts))} |")
    return lines


ZERO_LIMITS = {1: 1.05, 2: 1.05, 3: 1.3}


def zero_section(result: dict) -> tuple[list[str], list[tuple]]:
    """Issue 36: ZeRO's memory per worker, a model too large for one worker, and its speed against stage 0 and
    PyTorch's own."""
    lines = ["## 7. ZeRO: the training state sharded across workers (text classification, MiniLM-L6, AdamW)",
             machine_line(result)]
    summaries: list[tuple] = []
    if "memory" in result:
        lines += ["Each worker's bytes between steps, as the engine counts the tensors it holds (`summary.json`'s "
                  "`parameter_bytes_by_rank`; the fullest worker), and in brackets the ZeRO paper's formula for "
                  "fp32 AdamW: 4 bytes per parameter of weights, 4 of gradients, 8 of moments, each divided by the "
                  "workers from its stage on (1: moments, 2: gradients, 3: weights). The small excess is the "
                  "padding of each unit to a multiple of the workers and, in stage 3, the pooler and classifier "
                  "that no unit module holds (kept whole).", "", *zero_memory_lines(result["memory"]), ""]
    if "speed" in result:
        speed = result["speed"]
        base = speed["stages"]["0"]
        lines += [f"Median step time at np=2 ({speed['controller']}), the stages taking turns in one job on the same "
                  "model and batches (batch 32 per worker); PyTorch's own under `torchrun` with Gloo on the same "
                  "model, batches, optimizer and clipping.", "", "| run | step s | ratio to stage 0 |",
                  "|---|---|---|"]
        for stage, seconds in speed["stages"].items():
            lines.append(f"| ddl_apps dist.zero={stage} | {seconds:.3f} | {seconds / base:.3f} |")
            if int(stage) in ZERO_LIMITS:
                summaries.append((f"ZeRO stage {stage} step time vs stage 0, np=2", f"<= {ZERO_LIMITS[int(stage)]}x",
                                  f"{seconds / base:.3f}x", verdict(seconds / base, ZERO_LIMITS[int(stage)], False)))
        names = {"zero_redundancy": "PyTorch DDP + ZeroRedundancyOptimizer (stage 1)",
                 "fsdp2": "PyTorch FSDP2 fully_shard (stage 3)"}
        for peer, seconds in speed["peers"].items():
            lines.append(f"| {names[peer]} | {seconds:.3f} | {seconds / base:.3f} |")
        lines.append("")
    if "too_large" in result:
        large = result["too_large"]
        lines += [f"A model one worker cannot train: `ddl train nlp_minilm {' '.join(large['overrides'])}` with every "
                  f"process's RLIMIT_DATA at {large['cap_gib']} GiB (set on the launcher, inherited by each worker).",
                  "", "| workers | dist.zero | exit | steps trained | s | how it ended |", "|---|---|---|---|---|---|"]
        for run in large["runs"]:
            ended = run["message"] or ("trained" if run["exit"] == 0 else run["tail"].strip().splitlines()[-1][:200])
            lines.append(f"| {run['workers']} | {run['stage']} | {run['exit']} | {run['steps_trained']} | "
                         f"{run['seconds']} | {ended.replace('|', '/')} |")
        lines.append("")
    return lines, summaries


def export_section(result: dict) -> tuple[list[str], list[tuple]]:
    """Issue 38: onnxruntime's latency on one example against the framework's, on one core (no target)."""
    lines = ["## 8. ONNX export: one example on one core, onnxruntime against the framework", machine_line(result),
             f"Each recipe's model as it ships, after one short run, written by `ddl export RUN_DIR --format onnx`; "
             f"the median of {result['calls']} calls after {result['warm_up']} warm-up calls (the two taking turns "
             "every 20 calls) in a process pinned to CPU 0 (`taskset -c 0`), one thread in the framework (PyTorch, "
             "or TensorFlow for the image model) and in onnxruntime. The difference is `ddl export`'s own check on "
             "its example batch; the test split's are in [ONNX export](docs/export.md#how-close-the-graph-is-to-the-"
             "framework).", "",
             "| recipe | one call | framework ms | onnxruntime ms | framework / onnxruntime | ONNX MiB | "
             "example difference |", "|---|---|---|---|---|---|---|"]
    asides = {"model_alone_ms": "the model alone", "eager_ms": "called eagerly"}
    for row in result["rows"]:
        aside = "".join(f" ({label}: {row[key]:.3f} ms)" for key, label in asides.items() if key in row)
        lines.append(f"| {row['recipe']} | {row['call']} | {row['framework_ms']:.3f}{aside} | "
                     f"{row['onnxruntime_ms']:.3f} | {row['ratio']:.2f} | {row['onnx_mib']} | "
                     f"{row['example_difference']:.1e} |")
    return lines + [""], []


def tabular_section(result: dict) -> tuple[list[str], list[tuple]]:
    """Issue 37: the network against both baselines, in the same runs, on tables of every size."""
    lines = ["## 9. Tabular quality: the network against gradient boosting and logistic regression",
             machine_line(result),
             "Each table trained at np=2 with a shipped recipe's defaults (for a public table only the data section a "
             "new user writes: the label, categorical, time and id columns), once per seed; the same run fits both "
             "baselines on the same split and features and scores the same test rows. Test figures: the mean over "
             "the seeds, each seed's in brackets. Seconds: the network's training, the baselines' fit (means).", "",
             "| table | recipe | PR-AUC: network | gradient boosting | logistic | ROC-AUC: network | gradient boosting "
             "| logistic | seconds: network / gradient boosting / logistic |", "|---|---|---|---|---|---|---|---|---|"]
    models = ("network", "gradient_boosting", "logistic")
    means: dict[str, dict[str, dict[str, float]]] = {}
    for name, table in result["tables"].items():
        runs = table["runs"]
        means[name] = {model: {key: sum(r[model][key] for r in runs) / len(runs) for key in ("pr_auc", "roc_auc",
                                                                                                "seconds")}
                       for model in models}
        cells = [f"{means[name][model][metric]:.4f} ({' / '.join(f'{r[model][metric]:.4f}' for r in runs)})"
                 for metric in ("pr_auc", "roc_auc") for model in models]
        seconds = " / ".join(f"{means[name][model]['seconds']:.1f}" for model in models)
        lines.append(f"| {name}: {table['described']} | {table['recipe']} | {' | '.join(cells)} | {seconds} |")
    summaries = []
    if "ieee-cis" in means:
        m = means["ieee-cis"]
        ratio = m["network"]["pr_auc"] / m["gradient_boosting"]["pr_auc"]
        summaries.append(("tabular: IEEE-CIS PR-AUC, network / gradient boosting", ">= 1.0", f"{ratio:.3f}",
                          verdict(ratio, 1.0)))
    if "telco-churn" in means:
        m = means["telco-churn"]
        ratio = m["network"]["roc_auc"] / max(m["gradient_boosting"]["roc_auc"], m["logistic"]["roc_auc"])
        summaries.append(("tabular: churn ROC-AUC, network / the better baseline", ">= 1.0", f"{ratio:.4f}",
                          verdict(ratio, 1.0)))
    above = [name for name, m in means.items()
             if all(m["network"][metric] > m["logistic"][metric] for metric in ("pr_auc", "roc_auc"))]
    below = ", ".join(sorted(set(means) - set(above))) or "none"
    summaries.append(("tabular: network above logistic regression (PR-AUC and ROC-AUC)", "every table",
                      f"{len(above)} of {len(means)} (not: {below})", verdict(len(above), len(means))))
    return lines + [""], summaries


SECTIONS = {"allreduce": allreduce_section, "scaling": scaling_section, "overhead": overhead_section,
            "peer": peer_section, "data": data_section, "hosts": hosts_section, "zero": zero_section,
            "export": export_section, "tabular": tabular_section}


def build() -> Path:
    body, summaries = [], []
    for name, section in SECTIONS.items():
        result = read_result(name)
        if result is None:
            body += [f"## {name}", f"Not measured yet: run `ddl bench {name}`.", ""]
            continue
        lines, summary = section(result)
        body += lines
        summaries += summary
    table = ["## Targets", "", "| benchmark | target | result | |", "|---|---|---|---|",
             *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summaries], ""]
    notes = (REPO / "benchmarks" / "NOTES.md")
    tail = ["## Where a target is missed, and why", notes.read_text()] if notes.exists() else []
    tmp = OUT.with_suffix(".md.tmp")
    tmp.write_text("\n".join([INTRO, *table, *body, *tail]).rstrip() + "\n")
    tmp.replace(OUT)
    print(f"wrote {OUT}")
    return OUT


if __name__ == "__main__":
    build()
