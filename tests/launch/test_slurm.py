"""The shipped SLURM script, examples/slurm/train.sbatch, submitted to a real two-node SLURM cluster on one machine.

The two hosts of tests/launch/hosts.py (network namespaces on one switch, an SSH server in each) become the nodes
node1 and node2: munged runs on the machine, slurmctld and node1's slurmd in the first host, node2's slurmd in the
second. The nodes share the machine's file system, as a cluster's nodes share the one jobs are submitted from.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ddl_apps.core.checkpoint import list_checkpoints
from tests.engine_runs import PROBE, REPO, final_weights, summary
from tests.launch.hosts import ADDRESSES, NODES, Hosts
from tests.launch.test_multihost import two_hosts, workers_started_over_ssh  # noqa: F401 (two_hosts: a fixture)

pytestmark = pytest.mark.distributed

SCRIPT = "examples/slurm/train.sbatch"
# What a user of a CPU cluster gives sbatch: its options win over the script's #SBATCH lines, which ask for GPUs.
ON_CPUS = ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0")
# The probe (48 steps) with a checkpoint every 4: scancel comes well before its end.
OVERRIDES = ("run.checkpoint_every=4",)
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"}  # the job states of a job not yet over


@dataclass
class Cluster:
    hosts: Hosts
    top: Path  # slurm.conf, the daemons' logs, spool and state
    env: dict[str, str]  # a user's environment on node1: SLURM_CONF, the repository importable, the hosts' ssh

    def command(self, *argv: str) -> str:
        """A SLURM command as a user on node1 types it (in the repository root); its output."""
        done = subprocess.run(["ip", "netns", "exec", self.hosts.namespaces[0], *argv], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{shlex.join(argv)}: {done.stdout}{done.stderr}{self.daemon_logs()}"
        return done.stdout

    def submit(self, output: Path, run_dir: Path, *args: str, launch: str = "srun") -> str:
        """sbatch the script on 2 nodes x 1 task, the launch mode and run directory in the environment as its
        header says; the job's id."""
        export = f"--export=ALL,LAUNCH={launch},RUN_DIR={run_dir}"
        return self.command("sbatch", "--parsable", f"--output={output}", *ON_CPUS, export, SCRIPT, PROBE,
                            *OVERRIDES, *args).strip()

    def job(self, job: str) -> dict[str, str]:
        """The fields of `scontrol show job` (JobState, ExitCode...)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.command("scontrol", "show", "job", "--oneliner", job)))

    def wait(self, job: str, timeout: float = 240) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (fields := self.job(job))["JobState"] in ACTIVE:
            assert time.monotonic() < deadline, f"job {job} still {fields['JobState']} after {timeout} s"
            time.sleep(0.2)
        return fields

    def run_to_end(self, output: Path, run_dir: Path, *args: str, launch: str = "srun") -> str:
        """A job of the script that must succeed: its output."""
        fields = self.wait(self.submit(output, run_dir, *args, launch=launch))
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), read(output) + self.daemon_logs()
        return read(output)

    def daemon_logs(self) -> str:
        return "".join(f"\n--- {log.name}:\n{log.read_text()[-3000:]}" for log in sorted(self.top.glob("*.log")))


def read(output: Path) -> str:
    """A job's output (sbatch --output), which exists once the job has started."""
    return output.read_text() if output.exists() else f"(no {output})"


def write_slurm_conf(top: Path) -> Path:
    """Both nodes share this machine's file system, so each slurmd has its own spool directory and pid file (%n:
    the node's name), and its own TmpFS, where SLURM's PMIx plugin makes its client directories: in one shared
    /tmp, the second node fails "pmixp_mkdir: Cannot create directory /tmp/spmix_appdir_0_2.0: File exists". No
    cgroups, no accounting: nothing here touches the machine's own."""
    for folder in ("state", "spool-node1", "spool-node2", "tmp-node1", "tmp-node2"):
        (top / folder).mkdir()
    nodes = "".join(f"NodeName={node} NodeAddr={address} CPUs=1 State=UNKNOWN\n"
                    for node, address in zip(NODES, ADDRESSES, strict=True))
    conf = top / "slurm.conf"
    conf.write_text(textwrap.dedent(f"""\
        ClusterName=ddltest
        SlurmctldHost={os.uname().nodename}({ADDRESSES[0]})
        SlurmUser=root
        AuthType=auth/munge
        AuthInfo=socket={top / "munge.socket"}
        StateSaveLocation={top / "state"}
        SlurmctldPidFile={top / "slurmctld.pid"}
        SlurmctldLogFile={top / "slurmctld.log"}
        SlurmdSpoolDir={top / "spool-%n"}
        SlurmdPidFile={top / "slurmd-%n.pid"}
        SlurmdLogFile={top / "slurmd-%n.log"}
        TmpFS={top / "tmp-%n"}
        ProctrackType=proctrack/pgid
        TaskPlugin=task/none
        JobAcctGatherType=jobacct_gather/none
        AccountingStorageType=accounting_storage/none
        SelectType=select/cons_tres
        SelectTypeParameters=CR_CPU
        MpiDefault=none
        ReturnToService=2
        KillWait=5
        """) + nodes + f"PartitionName=all Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP\n")
    return conf


def start_munged(top: Path) -> subprocess.Popen:
    """munged with a new key and its own socket. --force: munged wants a socket directory that everyone may enter,
    and pytest's temporary directories are root's alone (only root uses this one)."""
    key = top / "munge.key"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
    files = {"key-file": key, "socket": top / "munge.socket", "pid-file": top / "munged.pid",
             "log-file": top / "munged.log", "seed-file": top / "munged.seed"}
    return subprocess.Popen(["munged", "--foreground", "--force", *(f"--{k}={v}" for k, v in files.items())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def on_host(ns: str, *argv: str) -> list[str]:
    """argv in NS's network and with its /etc/hosts, as `ip netns exec` runs it but on the machine's /sys: that
    remounts /sys, hiding /sys/fs/cgroup, and slurmd 22.05 will not start without a cgroup file system ("error: No
    filesystem mounted on /sys/fs/cgroup ... slurmd initialization failed"), whatever plugins it is configured
    with. The /etc/hosts mount is private to the command."""
    hosts = Path("/etc/netns") / ns / "hosts"
    return ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "--propagation", "private",
            "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), *argv]


def start_daemons(hosts: Hosts, top: Path, conf: Path) -> list[subprocess.Popen]:
    first = hosts.namespaces[0]
    commands = [["ip", "netns", "exec", first, "slurmctld", "-D", "-f", str(conf)]]
    commands += [on_host(ns, "slurmd", "-D", "-N", node, "-f", str(conf))
                 for ns, node in zip(hosts.namespaces, NODES, strict=True)]
    return [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for command in commands]


def wait_for_idle_nodes(cluster: Cluster, daemons: list[subprocess.Popen], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (states := cluster.command("sinfo", "--noheader", "--Node", "--format=%N %T").split()) != [
            "node1", "idle", "node2", "idle"]:
        assert all(d.poll() is None for d in daemons), f"a SLURM daemon exited: {cluster.daemon_logs()}"
        assert time.monotonic() < deadline, f"nodes not idle: {states}{cluster.daemon_logs()}"
        time.sleep(0.2)


def stop(cluster: Cluster) -> None:
    """Cancel what is left (a failed test's job) and wait for it to go, so that no worker outlives its node."""
    cluster.command("scancel", "--user=root")
    deadline = time.monotonic() + 30
    while cluster.command("squeue", "--noheader") and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(two_hosts, tmp_path_factory):  # noqa: F811
    if not shutil.which("slurmctld") or not shutil.which("munged"):
        pytest.skip("needs SLURM and MUNGE (apt-get install slurm-wlm munge; scripts/setup.sh installs them)")
    top = tmp_path_factory.mktemp("slurm")
    conf = write_slurm_conf(top)
    env = two_hosts.user_env(SLURM_CONF=str(conf))
    cluster = Cluster(two_hosts, top, env)
    daemons = [start_munged(top)]
    try:
        daemons += start_daemons(two_hosts, top, conf)
        wait_for_idle_nodes(cluster, daemons)
        yield cluster
        stop(cluster)
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()
            daemon.wait()


def assert_trained_on_both_nodes(run_dir: Path, log: str) -> None:
    assert "2 workers: rank 0 on node1; rank 1 on node2" in log, log
    done = summary(run_dir)
    digests = done["weights_sha256_by_rank"]
    assert done["workers"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert done["hosts_by_rank"] == list(NODES)


@pytest.fixture(scope="module")
def srun_run(cluster, tmp_path_factory) -> tuple[Path, str]:
    """The default launch mode's run (the reference of the other tests): its run directory and output."""
    run_dir = tmp_path_factory.mktemp("srun") / "run"
    return run_dir, cluster.run_to_end(run_dir.with_suffix(".out"), run_dir)


def test_srun_trains_one_worker_on_each_node_without_ssh(cluster, srun_run):
    run_dir, log = srun_run
    assert_trained_on_both_nodes(run_dir, log)
    # srun --label tags each line with its rank: rank 1 is quiet, and rank 0 says where the run is.
    assert not [line for line in log.splitlines() if line.startswith("1:")], log
    assert f"0: run directory: {run_dir}" in log
    assert not any(workers_started_over_ssh(cluster.hosts, address, run_dir) for address in ADDRESSES)


def test_horovodrun_starts_the_workers_over_ssh_on_the_allocated_nodes(cluster, srun_run, tmp_path):
    run_dir = tmp_path / "run"
    log = cluster.run_to_end(tmp_path / "job.out", run_dir, launch="horovodrun")

    assert_trained_on_both_nodes(run_dir, log)
    assert Path(f"{run_dir}.hosts").read_text() == "node1 slots=1\nnode2 slots=1\n"
    remote = workers_started_over_ssh(cluster.hosts, ADDRESSES[1], run_dir)
    assert len(remote) == 1 and {"HOROVOD_RANK=1", "HOROVOD_HOSTNAME=node2"} <= set(remote[0])
    # Gloo here, MPI under srun: the same weights.
    np.testing.assert_allclose(final_weights(run_dir), final_weights(srun_run[0]), rtol=0, atol=1e-6)


def test_scancel_leaves_a_checkpoint_that_resume_continues_exactly(cluster, srun_run, tmp_path):
    run_dir = tmp_path / "run"
    job = cluster.submit(tmp_path / "cancelled.out", run_dir)
    deadline = time.monotonic() + 120
    while not list_checkpoints(run_dir / "checkpoints"):
        assert cluster.job(job)["JobState"] in ACTIVE and time.monotonic() < deadline, read(tmp_path / "cancelled.out")
        time.sleep(0.05)
    cluster.command("scancel", job)
    assert cluster.wait(job)["JobState"] == "CANCELLED"
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert checkpoints and not (run_dir / "model").exists()

    log = cluster.run_to_end(tmp_path / "resumed.out", run_dir, "--resume")

    assert f"resumed from {checkpoints[-1]}" in log, log
    np.testing.assert_allclose(final_weights(run_dir), final_weights(srun_run[0]), rtol=0, atol=1e-6)
