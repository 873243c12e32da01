"""Two hosts on one machine: two network namespaces joined by a veth pair, an SSH server in each, and `ddl train
--hostfile` launched from the first, so the second worker is started over SSH in the other host. A run where
nothing goes wrong, then faults between the hosts in the middle of a run without --elastic (issue 34, items 2 and
3): a network partition (blackhole routes both ways: packets vanish, no connection is refused; this kernel has no
netem) and a host that dies (its link down, every process in its namespace SIGKILLed), the host of rank 1 and the
host of rank 0 (which also holds the launcher). Every surviving worker stops within dist.timeout_s and a margin,
with one error naming the hosts it lost and the checkpoint to go on from, and the run goes on with --resume to the
uninterrupted run's weights."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ddl_apps.core.checkpoint import list_checkpoints
from tests.engine_runs import PROBE, REPO, final_weights, summary, train
from tests.launch import hosts
from tests.launch.hosts import ADDRESSES, Hosts, kill_host, partition, revive_host, workers_in
from tests.launch.test_elastic import assert_steps_continue, logged_steps

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces and starts SSH servers in them")
    with hosts.two_hosts(tmp_path_factory.mktemp("ssh"), str(os.getpid())) as made:
        yield made

TIMEOUT_S = 5
# 96 steps, a checkpoint every 16: a fault at the first leaves most of the run to go (a step takes about 60 ms).
RUN = ("optim.epochs=4", "run.checkpoint_every=16", f"dist.timeout_s={TIMEOUT_S}")
MARGIN_S = 15  # start-up of the error path, and a busy 2-core machine


def ddl_train(hosts: Hosts, run_dir: Path, hostfile: Path, *flags: str, run: tuple[str, ...] = RUN,
              where: str | None = None) -> subprocess.Popen:
    """`ddl train` of the probe from the first host (or the namespace `where`), as a user would type it there (no
    -np: the hostfile's slots); output captured."""
    env = hosts.user_env(OMP_NUM_THREADS="1")  # (the two hosts share this machine's 2 cores)
    command = [sys.executable, "-m", "ddl_apps.cli", "train", PROBE, f"run.dir={run_dir}", *run,
               "--hostfile", str(hostfile), "--gloo", *flags]
    return subprocess.Popen(["ip", "netns", "exec", where or hosts.namespaces[0], *command], cwd=REPO, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def to_the_end(job: subprocess.Popen) -> str:
    output, _ = job.communicate(timeout=240)
    assert job.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def hostfile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hosts") / "hostfile"
    first, second = ADDRESSES  # both forms a hostfile takes (horovodrun itself reads only the first)
    path.write_text(f"# two hosts, one slot each\n{first} slots=1\n{second}:1\n")
    return path


@pytest.fixture(scope="module")
def uninterrupted(two_hosts, hostfile, tmp_path_factory) -> Path:
    """A run over both hosts, nothing going wrong (the reference of the fault tests)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    to_the_end(ddl_train(two_hosts, run_dir, hostfile))
    return run_dir


def test_two_workers_on_two_hosts_over_ssh(two_hosts, uninterrupted):
    done = summary(uninterrupted)
    digests = done["weights_sha256_by_rank"]
    assert done["workers"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert done["hosts_by_rank"] == list(ADDRESSES)
    # Rank 0 runs beside the launcher on the first host; rank 1 was started by the second host's sshd, which
    # lives in the second namespace and so ran it there.
    remote = workers_started_over_ssh(two_hosts, ADDRESSES[1], uninterrupted)
    assert len(remote) == 1
    assert {"HOROVOD_RANK=1", f"HOROVOD_HOSTNAME={ADDRESSES[1]}"} <= set(remote[0])
    assert not workers_started_over_ssh(two_hosts, ADDRESSES[0], uninterrupted)


def workers_started_over_ssh(hosts: Hosts, address: str, run_dir: Path) -> list[list[str]]:
    """The commands the SSH server at `address` ran to start a worker of `run_dir`."""
    commands = [shlex.split(c) for c in hosts.commands_run_by_sshd(address)]
    return [c for c in commands if "ddl_apps.cli" in c and f"run.dir={run_dir}" in c]


# ---- faults between the hosts, without --elastic (issue 34, items 2 and 3) ----------------------------------------
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
def test_survivors_stop_naming_the_lost_host_and_the_run_resumes_exactly(fault, two_hosts, hostfile,
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
    print(f"{fault}: the launcher exited {seconds:.1f} s after the fault, {max(logged_steps(run_dir))} steps logged; "
          f"the run goes on from {checkpoint.name}")
    resumed = to_the_end(ddl_train(two_hosts, run_dir, hostfile, "--resume"))
    assert f"resumed from {checkpoint}" in resumed
    np.testing.assert_allclose(final_weights(run_dir), final_weights(uninterrupted), rtol=0, atol=1e-6)


def test_the_worker_of_a_host_whose_launcher_and_rank_0_died_stops(two_hosts, hostfile, tmp_path):
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


# ---- a slow host (issue 34, item 4) --------------------------------------------------------------------------
SLOW_HOST_CORES = 0.5  # the second host's share of one core (BENCHMARKS.md: what it costs, in `ddl bench hosts`)


def test_a_slow_host_slows_the_run_and_changes_nothing_else(two_hosts, hostfile, uninterrupted, tmp_path):
    """The second host throttled to half a core (a CPU quota): the run waits for it at every step, and ends with the
    weights of the run on two even hosts."""
    with hosts.cpu_quota(two_hosts, 1, SLOW_HOST_CORES) as group:
        to_the_end(ddl_train(two_hosts, tmp_path / "run", hostfile))
        throttled = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    assert int(throttled["nr_throttled"]) > 0  # (the worker of the second host ran under the quota)
    done = summary(tmp_path / "run")
    assert done["hosts_by_rank"] == list(ADDRESSES) and len(set(done["weights_sha256_by_rank"])) == 1
    np.testing.assert_array_equal(final_weights(tmp_path / "run"), final_weights(uninterrupted))


# ---- a host dies under --elastic (issue 34, item 2) ---------------------------------------------------------------
class Watched:
    """A launcher whose output is read as it comes, each line with the time it came."""

    def __init__(self, job: subprocess.Popen):
        self.job, self.lines = job, []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.job.stdout:
            self.lines.append((time.monotonic(), line))

    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> tuple[int, float, re.Match]:
        """The first line from index `after` on that matches: its index, time and match."""
        deadline = time.monotonic() + timeout
        while True:
            for index, (at, line) in enumerate(self.lines[after:], start=after):
                if found := re.search(pattern, line):
                    return index, at, found
            assert self.job.poll() is None and time.monotonic() < deadline, f"no {pattern!r}: {self.output()}"
            time.sleep(0.05)

    def to_the_end(self) -> str:
        self.job.wait(timeout=240)
        self.reader.join()
        assert self.job.returncode == 0, self.output()
        return self.output()


ELASTIC_TIMEOUT_S = 10  # (a worker that joins starts while the others wait, as long as this, on a busy machine)
ELASTIC_RUN = ("optim.epochs=40", "dist.cycle_time_ms=1", f"dist.timeout_s={ELASTIC_TIMEOUT_S}")  # 960 steps
REJOIN_AFTER_S = ("--blacklist-cooldown-range", "1", "2")  # (2 s: the shortest wait Horovod allows is 1)
# Alone, the survivor must still be training when the lost host is back and may rejoin: a few seconds, which at full
# speed would be most of the run. Its host is slowed to a tenth of a core meanwhile (about 30 ms a step).
SURVIVOR_CORES = 0.1
CHANGED = r"workers changed: training goes on with (\d) workers from step (\d+), the last commit \(rank \d's\): (.*)"


@pytest.fixture(scope="module")
def elastic_reference(tmp_path_factory) -> Path:
    """The elastic run's arguments on 2 workers on one host, undisturbed."""
    return train(tmp_path_factory.mktemp("elastic-reference") / "run", *ELASTIC_RUN, np=2)


def rank_0_host(placement: str) -> int:
    """Which host (0 or 1) holds rank 0 in a log's 'rank 0 on X; rank 1 on Y'."""
    return ADDRESSES.index(re.match(r"rank 0 on (\S+?);", placement).group(1))


# Slow because it must: each fault waits out dist.timeout_s, and then the lost host's wait to rejoin.
def test_an_elastic_run_goes_on_without_a_lost_host_takes_it_back_and_ends_undisturbed(two_hosts, hostfile,
                                                                                     elastic_reference, tmp_path):
    """From the login node, with --elastic: the host of rank 1 dies, and later the host of rank 0 (by then either);
    each time the other host goes on alone, and the lost one rejoins once it is back (its link up, its sshd
    restarted). The run ends with the weights of an undisturbed run."""
    run_dir = tmp_path / "run"
    job = Watched(ddl_train(two_hosts, run_dir, hostfile, "--elastic", *REJOIN_AFTER_S, run=ELASTIC_RUN,
                            where=two_hosts.login))
    index, _, placed = job.wait_for(r"2 workers: (rank 0 on .*)", 60)
    victims, seen = [1 - rank_0_host(placed.group(1))], []
    while max(logged_steps(run_dir), default=0) < 100:
        assert job.job.poll() is None, job.output()
        time.sleep(0.02)
    for _ in range(2):  # (the second fault comes right after the rejoin, before the next commit)
        logged = max(logged_steps(run_dir))
        kill_host(two_hosts, victims[-1])
        lost = time.monotonic()
        index, dropped, alone = job.wait_for(CHANGED, 60, after=index + 1)
        assert alone.group(1) == "1" and alone.group(3) == f"rank 0 on {ADDRESSES[1 - victims[-1]]}", job.output()
        assert logged - 10 <= int(alone.group(2)) <= logged + 10, job.output()  # (commits come with log lines)
        with hosts.cpu_quota(two_hosts, 1 - victims[-1], SURVIVOR_CORES):
            revive_host(two_hosts, victims[-1])
            index, back, both = job.wait_for(CHANGED, 60, after=index + 1)
        assert both.group(1) == "2" and ADDRESSES[victims[-1]] in both.group(3), job.output()
        seen.append((dropped - lost, logged, int(alone.group(2)), back - dropped))
        victims.append(rank_0_host(both.group(3)))
    job.to_the_end()
    for (detected_s, logged, from_step, back_s), victim in zip(seen, ("rank 1", "rank 0"), strict=False):
        print(f"elastic, the host of {victim} dies after step {logged} was logged: dropped {detected_s:.1f} s after, "
              f"the run went on from step {from_step}; the host rejoined {back_s:.1f} s after it was dropped")
        assert detected_s < ELASTIC_TIMEOUT_S + MARGIN_S
    note = job.output()[-4000:]
    assert_steps_continue(run_dir, note)
    assert summary(run_dir)["workers"] == 2, note
    np.testing.assert_allclose(final_weights(run_dir), final_weights(elastic_reference), rtol=0, atol=1e-6,
                               err_msg=job.output())

