"""The benchmark tooling: a real (small) allreduce sweep against torch.distributed, the report built from results
(tables, verdicts against the targets, charts), and `ddl bench` refusing an unknown part. Timings never gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common, report, timeline
from tests.engine_runs import ddl

REPO = Path(__file__).resolve().parent.parent
MACHINE = {"cpu": "test cpu", "cores": 2, "memory_gib": 1.0, "python": "3.11", "kernel": "k", "torch": "t",
           "tensorflow": "tf", "horovod": "h", "date": "today"}


def spread(median: float) -> dict:
    return {"median": median, "min": median * 0.9, "max": median * 1.1, "n": 5}


def write(results: Path, name: str, payload: dict) -> None:
    (results / f"{name}.json").write_text(json.dumps({"machine": MACHINE, **payload}))


@pytest.fixture
def results(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    monkeypatch.setattr(common, "RESULTS", folder)
    monkeypatch.setattr(report, "OUT", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(report, "CHARTS", tmp_path / "charts")
    return folder


def allreduce_row(size: int, ours_ms: float, peer_ms: float) -> dict:
    runner = {"median_ms": ours_ms, "min_ms": ours_ms, "max_ms": ours_ms, "algbw_gb_s": 1.0}
    peer = {**runner, "median_ms": peer_ms}
    return {"bytes": size, "runners": {"ddl_apps (mpi)": runner, report_peer(): peer},
            "ratio_vs_peer": {"ddl_apps (mpi)": round(peer_ms / ours_ms, 3)}}


def report_peer() -> str:
    from benchmarks.allreduce import PEER

    return PEER


def test_report_states_every_ratio_and_verdict(results, tmp_path):
    write(results, "allreduce", {"repeats": 3, "shipped": "ddl_apps (mpi)", "settings": {"cycle_time_ms": 5},
                                 "rows": [allreduce_row(4096, 1.0, 0.5),  # below 64 KB: not judged
                                          allreduce_row(65536, 1.0, 2.0), allreduce_row(1 << 20, 2.0, 1.9)]})
    write(results, "scaling", {
        "rows": [{"recipe": "fraud_mlp", "np1_samples_per_s": spread(100.0), "np2_samples_per_s": spread(190.0),
                  "efficiency": 0.95, "np1_spare_core_samples_per_s": spread(105.0),
                  "efficiency_vs_spare_core": 0.905, "step_ms_np1": 10.0, "step_ms_np2": 10.5,
                  "timeline_np2": {"step_ms": 12.0, "collectives_ms": 0.4, "negotiation_ms": 0.1,
                                   "steps": 80}}],
        "autotune": {"recipe": "fraud_mlp", "steps": 2400, "samples_scored": 30, "tuned_samples_per_s": 180.0,
                     "shipped_samples_per_s": 190.0, "finished": False,
                     "best": {"cycle_time_ms": "2.5", "tensor_fusion_threshold": "8", "score": "1e9"}}})
    write(results, "overhead", {"rows": [{"recipe": "image_resnet", "engine_samples_per_s": spread(90.0),
                                          "hand_samples_per_s": spread(99.0), "step_time_ratio": 1.1}]})
    write(results, "peer", {"rows": [{"recipe": "nlp_minilm", "ddl_apps_samples_per_s": spread(50.0),
                                      "ddp_samples_per_s": spread(40.0), "throughput_ratio": 1.25}]})
    text = report.build().read_text()
    assert "| allreduce vs torch.distributed, 64 KB-256 MB | >= 1.0x | 0.95x at worst (1,024 KB) | **missed** |" in text
    assert "| scaling efficiency, fraud_mlp | >= 0.9 | 0.950 | met |" in text
    assert "| engine overhead, image_resnet | <= 1.03x | 1.100x | **missed** |" in text
    assert "| throughput vs DDP, nlp_minilm | >= 1.0x | 1.250x | met |" in text
    assert "| fraud_mlp | 100.0 (90.0-110.0) | 190.0 (171.0-209.0) | 0.950 | 105.0 (94.5-115.5) | 0.905 |" in text
    assert "not ended; the best-scored sample so far: cycle_time_ms 2.5, tensor_fusion_threshold 8." in text
    assert "180.0 tuned against 190.0" in text and "Machine: test cpu, 2 cores" in text
    for chart in ("allreduce", "scaling", "overhead", "peer"):
        assert (tmp_path / "charts" / f"{chart}.png").read_bytes()[:4] == b"\x89PNG"


def data_run(samples_per_s: float, peak_mib: list[int], first_step_s: float = 10.0) -> dict:
    return {"samples_per_s": spread(samples_per_s), "peak_rss_anon_mib": peak_mib, "first_step_s": first_step_s + 5,
            "worker_first_step_s": first_step_s}


def test_report_judges_the_prepared_data_benchmark(results):
    flat = {size: {"dataset_gib": gib, "np2": data_run(100.0, [500, 510], first), "np1": data_run(50.0, [400], 9.0),
                   "memory_ratio": memory, "first_step_ratio": ratio, "np2_vs_np1_first_step": first / 9.0}
            for size, gib, memory, first, ratio in (("1x", 0.5, 1.0, 10.0, 1.0), ("16x", 8.0, 1.25, 10.5, 1.05))}
    write(results, "data", {
        "larger_than_memory": {"dataset_gib": 32.1, "train_rows": 38_000_000, "copies": 92, "write_seconds": 300,
                               "streamed": data_run(90.0, [900, 950]), "in_memory_normal_table": data_run(95, [1800]),
                               "throughput_ratio": 0.947},
        "flat": flat,
        "input": {"fraud_mlp": {"pipeline_one_core_samples_per_s": spread(300.0), "training_step_samples_per_s": 120.0,
                                "ratio": 2.5}},
        "bytes_per_worker": {"np2": {"largest_share": 0.52, "times_1_over_n": 1.04},
                             "np4": {"largest_share": 0.26, "times_1_over_n": 1.04}},
        "object_storage": {"local": data_run(100.0, [1]), "s3_cold_cache": data_run(85.0, [1]),
                           "s3_warm_cache": data_run(99.0, [1]), "cold_ratio": 0.85, "warm_ratio": 0.99},
        "order": {"chunks, seed 0": {"pr_auc": 0.44, "roc_auc": 0.86, "recall_at_1pct_fpr": 0.37}},
        "prepare": {"machine_memory_gib": 24.0, "largest_source_over_memory": 1.1, "sizes": {
            size: {"source": {"rows": rows, "columns": 109, "gib": gib}, "prepare_seconds": 60.0 * ratio,
                   "peak_rss_anon_mib": peak, "prepared_gib": round(gib * 0.7, 2), "memory_ratio": ratio}
            for size, rows, gib, peak, ratio in (("1x", 4_000_000, 1.6, 900, 1.0), ("16x", 64_000_000, 26.4, 1000,
                                                                                      1.111))}}})
    text = report.build().read_text()
    assert "| data: prepare peak memory, source larger than memory | <= 2,048 MiB | 1,000 MiB | met |" in text
    assert "| 16x | 64,000,000 | 26.4 | 18.48 | 67 | 1,000 | 1.111 |" in text
    assert "| data: peak memory per worker, >= 32 GiB table | <= 2,048 MiB | 950 MiB | met |" in text
    assert "| data: samples/s streamed (large) / in memory (normal) | >= 0.9x | 0.947x | met |" in text
    assert "| data: peak memory at 16x / 1x the data | <= 1.2x | 1.250x | **missed** |" in text
    assert "| data: time to first step np=2 / np=1 (1x) | <= 1.1x | 1.111x | **missed** |" in text
    assert "| data: input pipeline on one core / training step, fraud_mlp | >= 3x | 2.500x | **missed** |" in text
    assert "| data: S3 / local disk, cold cache | >= 0.8x | 0.850x | met |" in text
    assert "| chunks, seed 0 | 0.4400 | 0.8600 | 0.3700 |" in text


def test_report_judges_images_and_speech_from_shards(results):
    def media(first_np2: float, memory: float, ratio: float) -> dict:
        runs = {size: {"np2": data_run(100.0, [700, 720], first), "np1": data_run(60.0, [650], 10.0)}
                for size, first in (("1x", 10.0), ("10x", first_np2))}
        stages = {"read": spread(9000.0), "read_decode_resize": spread(3000.0),
                  "read_decode_resize_augment": spread(1000.0)}
        return {"prepare": {size: {"seconds": 12.5, "gib": 0.1, "train_rows": rows}
                            for size, rows in (("1x", 7000), ("10x", 70000), ("shipped", 3500))},
                "flat": {"runs": runs, "memory_ratio": memory,
                         "first_step_np2_vs_np1": {"1x": 1.0, "10x": first_np2 / 10.0}},
                "input": {"pipeline_one_core_samples_per_s": stages, "training_step_samples_per_s": 400.0,
                          "ratio": 2.5},
                "shipped": {"shards_samples_per_s": [390.0, 400.0], "in_memory_samples_per_s": [400.0, 410.0],
                            "ratio": ratio}}

    write(results, "data", {"images": media(10.5, 1.02, 0.96), "speech": {**media(12.0, 1.3, 0.9), "hours": 20.4}})
    text = report.build().read_text()
    assert "| images: peak memory per worker, 10x / 1x the files | <= 1.2x | 1.020x | met |" in text
    assert "| images: time to first step np=2 / np=1 (10x) | <= 1.1x | 1.050x | met |" in text
    assert "| images: input pipeline on one core / training step | >= 3x | 2.500x | **missed** |" in text
    assert "| images: samples/s from shards / in memory (shipped data) | >= 0.95x | 0.960x | met |" in text
    assert "| speech: peak memory per worker, 10x / 1x the files | <= 1.2x | 1.300x | **missed** |" in text
    assert "| speech: time to first step np=2 / np=1 (10x) | <= 1.1x | 1.200x | **missed** |" in text
    assert "20.4 hours at 10x" in text and "| 10x | 70,000 | 12.5 | 0.1 | 700, 720 | 12.0 | 10.0 | 1.200 |" in text
    assert "read decode resize augment: 1,000" in text


def phase(pid: int, name: str, start: int, end: int, inner: str | None = None) -> list[dict]:
    nested = [{"ph": "B", "name": inner, "ts": start + 1, "pid": pid}, {"ph": "E", "ts": end - 1, "pid": pid}]
    return [{"ph": "B", "name": name, "ts": start, "pid": pid}, *(nested if inner else []),
            {"ph": "E", "ts": end, "pid": pid}]


def test_timeline_gives_each_steps_collectives_and_waiting(tmp_path):
    """Two gradients fused into one allreduce per step (overlapping rows count once), a loss allreduced once
    (not a per-step tensor), step 0 skipped; Horovod leaves the JSON array open with a trailing comma."""
    events = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "grad.a"}}]
    for step, (wait, run) in enumerate([(5000, 9000), (1000, 2000), (3000, 4000)]):
        t0 = step * 100_000
        for pid in (1, 2):
            events += phase(pid, "NEGOTIATE_ALLREDUCE", t0, t0 + wait)
            events += phase(pid, "ALLREDUCE", t0 + wait + 10 * (pid - 1), t0 + wait + run, inner="MPI_ALLREDUCE")
    events += phase(3, "NEGOTIATE_ALLREDUCE", 0, 50_000) + phase(3, "ALLREDUCE", 50_000, 90_000)
    trace = tmp_path / "timeline.json"
    trace.write_text("[\n" + ",\n".join(json.dumps(e) for e in events) + ",\n")
    assert timeline.per_step_ms(trace, skip=1) == {"step_ms": 100.0, "collectives_ms": 3.0, "negotiation_ms": 2.0,
                                                    "steps": 2}
    with pytest.raises(ValueError, match="no collective repeated on more than 3 steps"):
        timeline.per_step_ms(trace, skip=3)


def test_report_gives_what_a_slow_host_costs(results):
    write(results, "hosts", {"recipe": "fraud_mlp", "steps_per_window": 40, "windows": 6, "runs": 1,
                             "even_samples_per_s": spread(1000.0),
                             "rows": [{"slow_host_cores": 0.5, "samples_per_s": spread(600.0), "ratio": 0.6},
                                      {"slow_host_cores": 0.25, "samples_per_s": spread(200.0), "ratio": 0.2}]})
    text = report.build().read_text()
    assert "| 0.5 of a core | 600.0 (540.0-660.0) | 0.600 | 1.20 |" in text
    assert "| 0.25 of a core | 200.0 (180.0-220.0) | 0.200 | 0.80 |" in text
    assert "host" not in text.split("## Targets")[1].split("\n## ")[0]  # (a figure, not a target)


def test_report_judges_zero(results):
    """Issue 36's section: bytes beside the paper's formulas, step times against stage 0 (1.05x for stages 1 and
    2, 1.3x for stage 3), and how each capped run ended."""
    mib = 2**20
    held = {"parameters": 4 * mib, "gradients": 2 * mib, "optimizer_state": 4 * mib, "sharded": 0}
    formula = {"parameters": 4 * mib, "gradients": 2 * mib, "optimizer_state": 4 * mib}
    write(results, "zero", {
        "memory": [{"workers": 2, "stage": 2, "held": held, "formula": formula}],
        "speed": {"controller": "mpi", "stages": {"0": 1.0, "1": 1.04, "2": 1.1, "3": 1.2},
                  "peers": {"zero_redundancy": 0.9, "fsdp2": 1.5}},
        "too_large": {"cap_gib": 3.1, "overrides": ["model.hidden_size=1024"], "runs": [
            {"workers": 1, "stage": 0, "exit": 2, "steps_trained": 0, "seconds": 9.0,
             "message": "error: rank 0 ran out of memory", "tail": "..."},
            {"workers": 2, "stage": 3, "exit": 0, "steps_trained": 4, "seconds": 28.0, "message": "", "tail": ""}]}})
    text = report.build().read_text()
    assert "| ZeRO stage 1 step time vs stage 0, np=2 | <= 1.05x | 1.040x | met |" in text
    assert "| ZeRO stage 2 step time vs stage 0, np=2 | <= 1.05x | 1.100x | **missed** |" in text
    assert "| ZeRO stage 3 step time vs stage 0, np=2 | <= 1.3x | 1.200x | met |" in text
    assert "| 2 | 2 | 4.0 (4.0) | 2.0 (2.0) | 4.0 (4.0) | 10.0 | 10.0 |" in text
    assert "| PyTorch FSDP2 fully_shard (stage 3) | 1.500 | 1.500 |" in text
    assert "| 1 | 0 | 2 | 0 | 9.0 | error: rank 0 ran out of memory |" in text
    assert "| 2 | 3 | 0 | 4 | 28.0 | trained |" in text


def test_report_gives_onnx_latencies(results):
    """Issue 38's section: each recipe's single-example latency in the framework and in onnxruntime (no target)."""
    write(results, "export", {"calls": 200, "warm_up": 20, "rows": [
        {"recipe": "churn_tabm", "framework_ms": 20.0, "onnxruntime_ms": 0.08, "model_alone_ms": 0.15, "ratio": 250.0,
         "onnx_mib": 0.2, "example_difference": 4.5e-08, "call": "one row"},
        {"recipe": "nlp_minilm", "framework_ms": 9.0, "onnxruntime_ms": 3.0, "ratio": 3.0, "onnx_mib": 87.0,
         "example_difference": 0.0, "call": "one review"}]})
    text = report.build().read_text()
    assert "| churn_tabm | one row | 20.000 (the model alone: 0.150 ms) | 0.080 | 250.00 | 0.2 | 4.5e-08 |" in text
    assert "| nlp_minilm | one review | 9.000 | 3.000 | 3.00 | 87.0 | 0.0e+00 |" in text


def tabular_run(seed: int, network: tuple[float, float], boosting: tuple[float, float],
                logistic: tuple[float, float]) -> dict:
    def model(figures: tuple[float, float]) -> dict:
        return {"pr_auc": figures[0], "roc_auc": figures[1], "seconds": 10.0}

    return {"seed": seed, "network": {**model(network), "best_epoch": 3}, "gradient_boosting": model(boosting),
            "logistic": model(logistic)}


def test_report_judges_tabular_quality(results):
    """Issue 37's section: each table's means over seeds, and the three targets judged on them."""
    write(results, "tabular", {"tables": {
        "ieee-cis": {"recipe": "fraud_mlp", "described": "590,540 rows", "runs": [
            tabular_run(0, (0.46, 0.86), (0.48, 0.88), (0.37, 0.87)),
            tabular_run(1, (0.48, 0.86), (0.48, 0.88), (0.37, 0.85))]},
        "telco-churn": {"recipe": "churn_tabm", "described": "7,043 rows", "runs": [
            tabular_run(0, (0.67, 0.85), (0.65, 0.84), (0.66, 0.84))]}}})
    text = report.build().read_text()
    assert ("| ieee-cis: 590,540 rows | fraud_mlp | 0.4700 (0.4600 / 0.4800) | 0.4800 (0.4800 / 0.4800) | "
            "0.3700 (0.3700 / 0.3700) | 0.8600 (0.8600 / 0.8600) | 0.8800 (0.8800 / 0.8800) | "
            "0.8600 (0.8700 / 0.8500) | 10.0 / 10.0 / 10.0 |") in text
    assert "| tabular: IEEE-CIS PR-AUC, network / gradient boosting | >= 1.0 | 0.979 | **missed** |" in text
    assert "| tabular: churn ROC-AUC, network / the better baseline | >= 1.0 | 1.0119 | met |" in text
    assert ("| tabular: network above logistic regression (PR-AUC and ROC-AUC) | every table | 1 of 2 (not: "
            "ieee-cis) | **missed** |") in text


def test_report_names_what_was_not_measured(results):
    text = report.build().read_text()
    assert "Not measured yet: run `ddl bench scaling`." in text


@pytest.mark.distributed
def test_allreduce_benchmark_measures_both_sides(tmp_path):
    env = {**os.environ, "DDL_BENCH_RESULTS": str(tmp_path)}
    subprocess.run([sys.executable, str(REPO / "benchmarks/allreduce.py"), "--repeats", "3", "--max-mb", "0.0625"],
                   env=env, check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "allreduce.json").read_text())
    assert [row["bytes"] for row in result["rows"]] == [4096, 16384, 65536]
    ours, peer = result["shipped"], result["peer"]
    assert ours == "ddl_apps (mpi)"  # what `dist.controller: auto` picks on one host
    for row in result["rows"]:
        assert all(runner["median_ms"] > 0 for runner in row["runners"].values())
        measured = row["runners"][peer]["median_ms"] / row["runners"][ours]["median_ms"]
        assert row["ratio_vs_peer"][ours] == pytest.approx(measured, rel=0.01)
    assert result["machine"]["cores"] == os.cpu_count()


def test_ddl_bench_refuses_an_unknown_part():
    result = ddl("bench", "nosuch")
    assert result.returncode == 2 and "nosuch" in result.stderr


def test_every_benchmark_part_overrides_its_recipe_with_settings_it_has():
    """A renamed setting stopped `ddl bench data` at its first fraud run (`model.baseline`, which became
    `model.baselines`): every override the data and media parts pass validates against its recipe."""
    from benchmarks import data, hosts, media, onnx_latency, tabular_quality
    from ddl_apps.recipe import load_recipe

    runs = [(data.RECIPE, data.TRAIN), (hosts.RECIPE, hosts.TRAIN),
            *((recipe, overrides) for recipe, (overrides, _) in data.STEP_RUNS.items()),
            ("image_resnet", media.IMAGE_RUN), ("asr_conformer", media.SPEECH_RUN), *onnx_latency.RUNS.items(),
            *((table.recipe, table.data) for table in tabular_quality.TABLES.values())]
    for recipe, overrides in runs:
        load_recipe(recipe, list(overrides))  # (a RecipeError names the unknown setting)


def test_ddl_bench_offers_every_part_the_runner_has():
    from benchmarks import run
    from ddl_apps.cli import BENCHMARK_PARTS

    assert set(BENCHMARK_PARTS) == {*run.PARTS, "report"}
