"""Issue 34, items 2 and 3 without --elastic: faults between the two network-namespace hosts of test_multihost in the
middle of a run. A network partition (blackhole routes both ways: packets vanish, no connection is refused) and a
host that dies (every process in its namespace SIGKILLed, its link down), the host of rank 1 and the host of rank 0
(which also holds the launcher). Every surviving worker stops within dist.timeout_s and a margin, with one error
naming the hosts it lost and the checkpoint to go on from, and the run goes on with --resume to the uninterrupted
run's weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest

from ddl_apps.core.checkpoint import list_checkpoints
from tests.engine_runs import PROBE, REPO, final_weights, summary
from tests.launch.test_multihost import (
    ADDRESSES,
    Hosts,
    start_sshd,
    two_hosts,  # noqa: F401 (a fixture)
    wait_for_ssh,
)

pytestmark = pytest.mark.distributed

TIMEOUT_S = 5
# 144 steps, a checkpoint every 16: a fault at the first leaves most of the run to go (a step takes about 60 ms).
LONG = ("optim.epochs=6", "run.checkpoint_every=16", f"dist.timeout_s={TIMEOUT_S}")
MARGIN_S = 15  # start-up of the error path, and a busy 2-core machine


def ddl_train(hosts: Hosts, run_dir: Path, hostfile: Path, *flags: str) -> subprocess.Popen:
    """`ddl train` of the probe from the first host over both (output captured)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PATH": f"{hosts.ssh_dir / 'bin'}:{os.environ['PATH']}"}
    command = [sys.executable, "-m", "ddl_apps.cli", "train", PROBE, f"run.dir={run_dir}", *LONG,
               "--hostfile", str(hostfile), "--gloo", *flags]
    return subprocess.Popen(["ip", "netns", "exec", hosts.namespaces[0], *command], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def to_the_end(job: subprocess.Popen) -> str:
    output, _ = job.communicate(timeout=240)
    assert job.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def hostfile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hosts") / "hostfile"
    path.write_text(f"{ADDRESSES[0]} slots=1\n{ADDRESSES[1]} slots=1\n")
    return path


@pytest.fixture(scope="module")
def uninterrupted(two_hosts, hostfile, tmp_path_factory) -> Path:  # noqa: F811
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    to_the_end(ddl_train(two_hosts, run_dir, hostfile))
    digests = summary(run_dir)["weights_sha256_by_rank"]
    assert digests[0] == digests[1] and summary(run_dir)["hosts_by_rank"] == list(ADDRESSES)
    return run_dir


def workers_in(ns: str) -> list[int]:
    """The pids of the processes in a host's network namespace."""
    listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid in listed.split()]


def kill_host(hosts: Hosts, which: int) -> None:
    """The host's link down, then every process of the host SIGKILLed (its sshd, and the launcher on the first):
    as a host that loses its power, it says goodbye to no one (the other way round, its kernel would close its
    connections, and the peers would know at once)."""
    subprocess.run(["ip", "-n", hosts.namespaces[which], "link", "set", "ddl0", "down"], check=True)
    for pid in workers_in(hosts.namespaces[which]):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def revive_host(hosts: Hosts, which: int) -> None:
    subprocess.run(["ip", "-n", hosts.namespaces[which], "link", "set", "ddl0", "up"], check=True)
    server = start_sshd(hosts.namespaces[which], ADDRESSES[which], hosts.ssh_dir)
    wait_for_ssh(server, hosts.namespaces[0], ADDRESSES[which], hosts.ssh_dir)


def partition(hosts: Hosts, action: str) -> None:
    """Each host's route to the other as a blackhole ('add'), or back ('del')."""
    for ns, other in zip(hosts.namespaces, reversed(ADDRESSES), strict=True):
        subprocess.run(["ip", "-n", ns, "route", action, "blackhole", other], check=True)


def wait_for_a_checkpoint(run_dir: Path, job: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not list_checkpoints(run_dir / "checkpoints"):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
        time.sleep(0.02)


def gone_within(job: subprocess.Popen, seconds: float) -> tuple[str, float]:
    """The launcher's output once it has exited, and how long that took; it must exit within `seconds`."""
    start = time.monotonic()
    try:
        output, _ = job.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"still running {seconds} s after the fault: {job.communicate()[0]}")
    return output, time.monotonic() - start


@pytest.mark.parametrize("fault", ["partition", "host of rank 1 dies"])
def test_survivors_stop_naming_the_lost_host_and_the_run_resumes_exactly(fault, two_hosts, hostfile,  # noqa: F811
                                                                         uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    job = ddl_train(two_hosts, run_dir, hostfile)
    wait_for_a_checkpoint(run_dir, job)
    try:
        if fault == "partition":
            partition(two_hosts, "add")
        else:
            kill_host(two_hosts, 1)
        output, seconds = gone_within(job, TIMEOUT_S + MARGIN_S)
    finally:
        if fault == "partition":
            partition(two_hosts, "del")
        else:
            revive_host(two_hosts, 1)


    assert job.returncode == 75, output
    checkpoint = list_checkpoints(run_dir / "checkpoints")[-1]
    assert f"rank 0 on {ADDRESSES[0]} lost contact with the other workers (on {ADDRESSES[1]})" in output, output
    assert f"dist.timeout_s = {TIMEOUT_S} s" in output and f"The last checkpoint is {checkpoint}" in output
    print(f"{fault}: the launcher exited {seconds:.1f} s after the fault")
    resumed = to_the_end(ddl_train(two_hosts, run_dir, hostfile, "--resume"))
    assert f"resumed from {checkpoint}" in resumed
    np.testing.assert_allclose(final_weights(run_dir), final_weights(uninterrupted), rtol=0, atol=1e-6)


def test_the_worker_of_a_host_whose_launcher_and_rank_0_died_stops(two_hosts, hostfile, tmp_path):  # noqa: F811
    """The host of rank 0 holds the launcher too: nothing is left to report to, but rank 1 must not hang on."""
    run_dir = tmp_path / "run"
    job = ddl_train(two_hosts, run_dir, hostfile)
    wait_for_a_checkpoint(run_dir, job)
    survivors = [pid for pid in workers_in(two_hosts.namespaces[1])
                 if f"run.dir={run_dir}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert survivors
    try:
        kill_host(two_hosts, 0)
        job.wait()
        start = time.monotonic()
        while any(Path(f"/proc/{pid}").exists() for pid in survivors):
            assert time.monotonic() < start + TIMEOUT_S + MARGIN_S, f"rank 1 still running {TIMEOUT_S + MARGIN_S} s " \
                "after its peer died"
            time.sleep(0.1)
        print(f"host of rank 0 dies: rank 1 exited {time.monotonic() - start:.1f} s after")
    finally:
        revive_host(two_hosts, 0)
