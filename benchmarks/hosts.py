"""A slow host: the fraud recipe on two hosts, one worker each, launched with `ddl train --hostfile` as users do;
its training samples/s with both hosts even, then with the second host's CPU time capped (a cgroup CPU quota) at a
half and a quarter of a core. The hosts are network namespaces on this machine with an SSH server each
(tests/launch/hosts.py, as the multi-host tests build them; needs root), one compute thread per worker. Every step
waits for both workers, so the run goes at the slow host's pace: ratio = throttled samples/s / even samples/s.
Writes results/hosts.json.

    .venv/bin/python benchmarks/hosts.py [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import VENV_BIN, run, spread, window_rates, write_result  # noqa: E402
from tests.launch import hosts  # noqa: E402

RECIPE = "fraud_mlp"
STEPS, WINDOWS = 40, 7  # (as the scaling benchmark's fraud runs: the first window, start-up, is left out)
TRAIN = ("model.baselines=[]", "run.eval_every_epoch=false", "run.progress=false", f"run.log_every={STEPS}",
         f"run.max_steps={STEPS * WINDOWS}")
CORES = (0.5, 0.25)  # the slow host's share of one core


def train_across(two: hosts.Hosts, hostfile: Path, run_dir: Path) -> list[float]:
    """Samples/s of each log window after the first, from one run over both hosts launched from the first."""
    env = two.user_env(OMP_NUM_THREADS="1")
    run(["ip", "netns", "exec", two.namespaces[0], str(VENV_BIN / "ddl"), "train", RECIPE, f"run.dir={run_dir}",
         *TRAIN, "--hostfile", str(hostfile), "--gloo"], env=env)
    return window_rates(run_dir, WINDOWS, f"{RECIPE} over two hosts")


def measure(runs: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch, hosts.two_hosts(Path(scratch), "bench") as two:
        hostfile = Path(scratch) / "hostfile"
        hostfile.write_text("".join(f"{address} slots=1\n" for address in hosts.ADDRESSES))
        even, slow = [], {cores: [] for cores in CORES}
        for i in range(runs):
            even += train_across(two, hostfile, Path(scratch) / f"even-{i}")
            for cores in CORES:
                with hosts.cpu_quota(two, 1, cores):
                    slow[cores] += train_across(two, hostfile, Path(scratch) / f"slow-{cores}-{i}")
    baseline = spread(even, 1)
    rows = []
    for cores, rates in slow.items():
        throttled = spread(rates, 1)
        rows.append({"slow_host_cores": cores, "samples_per_s": throttled,
                     "ratio": round(throttled["median"] / baseline["median"], 3)})
        print(f"second host at {cores} core: {throttled['median']:,.1f} samples/s against {baseline['median']:,.1f} "
              f"on even hosts ({rows[-1]['ratio']:.3f}x)", flush=True)
    return {"recipe": RECIPE, "steps_per_window": STEPS, "windows": WINDOWS - 1, "runs": runs,
            "even_samples_per_s": baseline, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="runs of each setting, taking turns")
    args = parser.parse_args()
    if os.geteuid() != 0:  # (the rest of `make bench` goes on)
        print("hosts: not measured: it needs root (network namespaces, SSH servers, a CPU cgroup)", file=sys.stderr)
        return
    write_result("hosts", measure(args.runs))


if __name__ == "__main__":
    main()
