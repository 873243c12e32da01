"""`ddl bench zero` (issue 36): what ZeRO saves and what it costs, on the text-classification recipe.

- memory: each worker's bytes of parameters, gradients and optimizer state for stages 0-3 at np = 1, 2 and 4 (the
  engine's count of the tensors it holds between steps), beside the ZeRO paper's formulas for fp32 AdamW: 4 bytes
  per parameter of weights, 4 of gradients and 8 of moments, stage 1 dividing the moments by N, stage 2 also the
  gradients, stage 3 also the weights.
- too_large: a randomly initialised transformer whose replicated training state does not fit a cap on each
  worker's memory (RLIMIT_DATA, set on the launcher and inherited by every worker: it counts the private writable
  memory a process maps, so anonymous memory, where RLIMIT_AS counts all address space), trained for a few steps
  at np=1 and np=2 with dist.zero=0 and at np=2 with stage 3.
- speed: the median step time at np=2 of stages 0-3, in one job, and of PyTorch's own ZeRO under torchrun (Gloo)
  on the same model and batches: ZeroRedundancyOptimizer with DistributedDataParallel (stage 1) and FSDP2
  (`fully_shard`, stage 3).

    .venv/bin/python benchmarks/zero.py [--parts memory too_large speed]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import LAUNCH_ENV, REPO, VENV_BIN, launch_workers, read_result, shipped_controller, write_result  # noqa: E402

HERE = Path(__file__).resolve().parent
STAGES = (0, 1, 2, 3)
# 158 M parameters: 2.4 GiB of weights, gradients and AdamW moments when replicated
LARGE = ("model.pretrained=false", "model.hidden_size=1024", "model.num_hidden_layers=10",
         "model.num_attention_heads=16", "model.intermediate_size=4096", "model.baseline=false",
         "optim.batch_size=4", "optim.warmup_steps=0", "run.max_steps=4", "run.log_every=1", "run.progress=false")
CAP_GIB = 3.1


def engine_job(workers: int, rounds: int, steps: int, warmup: int) -> dict:
    """The engine's stages on `workers` workers, with the controller `ddl train` picks on one host."""
    from ddl_apps.core.launch import horovodrun_command, worker_env

    controller = shipped_controller()
    command = horovodrun_command([sys.executable, str(HERE / "zero_worker.py"), "--rounds", str(rounds), "--steps",
                                  str(steps), "--warmup", str(warmup)], workers, controller)
    return {"controller": controller, **launch_workers(command, worker_env(controller, elastic=None))}


def formulas(parameters: int, stage: int, workers: int) -> dict[str, float]:
    """The ZeRO paper's bytes per worker for fp32 AdamW (parameters: the model's count)."""
    return {"parameters": 4 * parameters / (workers if stage >= 3 else 1),
            "gradients": 4 * parameters / (workers if stage >= 2 else 1),
            "optimizer_state": 8 * parameters / (workers if stage >= 1 else 1)}


def memory() -> list[dict]:
    rows = []
    for workers in (1, 2, 4):
        job = engine_job(workers, rounds=1, steps=1, warmup=0)
        parameters = job["stages"][0]["bytes_by_rank"][0]["parameters"] // 4
        for stage in job["stages"]:
            held = max(stage["bytes_by_rank"], key=lambda rank: sum(rank.values()))  # (the fullest worker)
            rows.append({"workers": workers, "stage": stage["stage"], "held": held,
                         "formula": formulas(parameters, stage["stage"], workers)})
    return rows


def speed() -> dict:
    job = engine_job(2, rounds=4, steps=3, warmup=2)
    peers = {}
    for mode in ("zero_redundancy", "fsdp2"):
        command = [str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", str(HERE / "zero_peer.py"), mode,
                   "--steps", "8", "--warmup", "2"]
        peers[mode] = launch_workers(command)["step_s"]
    return {"controller": job["controller"], "stages": {stage["stage"]: stage["step_s"] for stage in job["stages"]},
            "peers": peers}


def capped_run(workers: int, stage: int, cap_bytes: int, run_dir: Path) -> dict:
    """`ddl train` of the large model with every process's RLIMIT_DATA at the cap: how it ended."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (cap_bytes, cap_bytes))

    started = time.perf_counter()
    result = subprocess.run([str(VENV_BIN / "ddl"), "train", "nlp_minilm", *LARGE, f"dist.zero={stage}",
                             f"run.dir={run_dir}", "-np", str(workers)], cwd=REPO, env={**os.environ, **LAUNCH_ENV},
                            capture_output=True, text=True, preexec_fn=limit, timeout=1800, check=False)
    output = result.stdout + result.stderr
    metrics = run_dir / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if '"train"' in line] if metrics.exists() else []
    message = next((line.strip() for line in output.splitlines() if "ran out of memory" in line), "")
    return {"workers": workers, "stage": stage, "exit": result.returncode, "steps_trained": max(steps, default=0),
            "seconds": round(time.perf_counter() - started, 1), "message": message[:600],
            "tail": "" if result.returncode == 0 else output[-1500:]}


def too_large() -> dict:
    cap = int(CAP_GIB * 2**30)
    with tempfile.TemporaryDirectory(prefix="ddl-zero-large-") as scratch:
        runs = [capped_run(workers, stage, cap, Path(scratch) / f"np{workers}-zero{stage}")
                for workers, stage in ((1, 0), (2, 0), (2, 3))]
    return {"cap_gib": CAP_GIB, "overrides": list(LARGE), "runs": runs}


PARTS = {"memory": memory, "too_large": too_large, "speed": speed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    args = parser.parse_args()
    kept = {k: v for k, v in (read_result("zero") or {}).items() if k != "machine"}  # (the parts not run now)
    write_result("zero", {**kept, **{part: PARTS[part]() for part in args.parts}})


if __name__ == "__main__":
    main()
