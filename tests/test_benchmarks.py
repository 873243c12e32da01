"""The benchmark tooling: a real (small) allreduce sweep against torch.distributed, the report built from results
(tables, verdicts against the targets, charts), and `ddl bench` refusing an unknown part. Timings never gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common, report
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
                                 "autotune_best": {"cycle_time_ms": "2.5"},
                                 "rows": [allreduce_row(4096, 1.0, 0.5),  # below 64 KB: not judged
                                          allreduce_row(65536, 1.0, 2.0), allreduce_row(1 << 20, 2.0, 1.9)]})
    write(results, "scaling", {"rows": [{"recipe": "fraud_mlp", "np1_samples_per_s": spread(100.0),
                                         "np2_samples_per_s": spread(190.0), "efficiency": 0.95,
                                         "step_ms_np1": 10.0, "step_ms_np2": 10.5}]})
    write(results, "overhead", {"rows": [{"recipe": "image_resnet", "engine_samples_per_s": spread(90.0),
                                          "hand_samples_per_s": spread(99.0), "step_time_ratio": 1.1}]})
    write(results, "peer", {"rows": [{"recipe": "nlp_minilm", "ddl_apps_samples_per_s": spread(50.0),
                                      "ddp_samples_per_s": spread(40.0), "throughput_ratio": 1.25}]})
    text = report.build().read_text()
    assert "| allreduce vs torch.distributed, 64 KB-256 MB | >= 1.0x | 0.95x at worst (1,024 KB) | **missed** |" in text
    assert "| scaling efficiency, fraud_mlp | >= 0.9 | 0.95 | met |" in text
    assert "| engine overhead, image_resnet | <= 1.03x | 1.100x | **missed** |" in text
    assert "| throughput vs DDP, nlp_minilm | >= 1.0x | 1.250x | met |" in text
    assert "cycle_time_ms 2.5" in text and "Machine: test cpu, 2 cores" in text
    for chart in ("allreduce", "scaling", "overhead", "peer"):
        assert (tmp_path / "charts" / f"{chart}.png").read_bytes()[:4] == b"\x89PNG"


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
