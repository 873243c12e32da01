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
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ddl_apps.core.checkpoint import list_checkpoints
from tests.engine_runs import PROBE, REPO, final_weights, summary

pytestmark = pytest.mark.distributed

ADDRESSES = ("10.213.0.1", "10.213.0.2")
NODES = ("node1", "node2")  # the hosts' names on a cluster (SLURM's node names), known on both hosts
# One name on both ends: horovodrun looks for an interface name that every host has in common.
IFACE = "ddl0"


@dataclass
class Hosts:
    namespaces: tuple[str, str]
    ssh_dir: Path  # the client's config and key, and what each server ran ("commands-<address>.log")

    def commands_run_by_sshd(self, address: str) -> list[str]:
        log = self.ssh_dir / f"commands-{address}.log"
        return log.read_text().splitlines() if log.exists() else []


def sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, f"{shlex.join(argv)}: {done.stderr}"


def join_namespaces(namespaces: tuple[str, str]) -> None:
    for ns in namespaces:
        sh("ip", "netns", "add", ns)
    a, b = namespaces
    sh("ip", "link", "add", IFACE, "netns", a, "type", "veth", "peer", "name", IFACE, "netns", b)
    for ns, address in zip(namespaces, ADDRESSES, strict=True):
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", IFACE)
        sh("ip", "-n", ns, "link", "set", IFACE, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def resolve_hostname_to_own_address(namespaces: tuple[str, str]) -> None:
    """Give each host an /etc/hosts (`ip netns exec` mounts /etc/netns/NS/hosts over it) that maps the machine's name
    to that host's address, as on a cluster, and each node name to its host's address. Horovod 0.28.1's process-set
    Gloo contexts ignore HOROVOD_GLOO_IFACE and bind to the address of the host's name, so a name that resolves to a
    loopback address breaks cross-host runs."""
    for ns, address in zip(namespaces, ADDRESSES, strict=True):
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        nodes = "".join(f"{a} {node}\n" for a, node in zip(ADDRESSES, NODES, strict=True))
        etc.joinpath("hosts").write_text(f"127.0.0.1 localhost\n{address} {socket.gethostname()}\n{nodes}")


def keygen(path: Path) -> str:
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path))
    return Path(f"{path}.pub").read_text().strip()


def write_client_config(ssh_dir: Path, host_keys: list[str]) -> None:
    """An `ssh` first on PATH that uses our key and known_hosts, so nothing of the user's ~/.ssh is read or written."""
    (ssh_dir / "known_hosts").write_text(
        "".join(f"{a},{node} {k}\n" for a, node, k in zip(ADDRESSES, NODES, host_keys, strict=True)))
    (ssh_dir / "config").write_text(textwrap.dedent(f"""\
        Host *
          User root
          IdentityFile {ssh_dir / "id_ed25519"}
          IdentitiesOnly yes
          UserKnownHostsFile {ssh_dir / "known_hosts"}
          BatchMode yes
          ConnectTimeout 10
          LogLevel ERROR
        """))
    wrapper = ssh_dir / "bin" / "ssh"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {ssh_dir / "config"} "$@"\n')
    wrapper.chmod(0o755)


def start_sshd(ns: str, address: str, ssh_dir: Path) -> subprocess.Popen:
    """sshd in NS, keys only; it records every command it runs (the evidence of where each worker started)."""
    log = ssh_dir / f"commands-{address}.log"
    (ssh_dir / f"run-{address}").write_text(
        f'#!/bin/bash\nprintf "%s\\n" "$SSH_ORIGINAL_COMMAND" >> {log}\nexec /bin/bash -c "$SSH_ORIGINAL_COMMAND"\n')
    (ssh_dir / f"run-{address}").chmod(0o755)
    config = ssh_dir / f"sshd-{address}.conf"
    config.write_text(textwrap.dedent(f"""\
        ListenAddress {address}
        HostKey {ssh_dir / f"host-{address}"}
        PidFile {ssh_dir / f"sshd-{address}.pid"}
        AuthorizedKeysFile {ssh_dir / "authorized_keys"}
        PermitRootLogin prohibit-password
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        StrictModes no
        ForceCommand {ssh_dir / f"run-{address}"}
        """))
    with open(ssh_dir / f"sshd-{address}.log", "w") as server_log:
        return subprocess.Popen(["ip", "netns", "exec", ns, "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                stdout=subprocess.DEVNULL, stderr=server_log)


def wait_for_ssh(server: subprocess.Popen, ns: str, address: str, ssh_dir: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        probe = subprocess.run(["ip", "netns", "exec", ns, str(ssh_dir / "bin" / "ssh"), address, "true"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return
        server_log = (ssh_dir / f"sshd-{address}.log").read_text()
        assert server.poll() is None, f"sshd on {address} exited: {server_log}"
        assert time.monotonic() < deadline, f"sshd on {address} does not answer: {probe.stderr}{server_log}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces and starts SSH servers in them")
    namespaces = (f"ddl{os.getpid()}a", f"ddl{os.getpid()}b")
    ssh_dir = tmp_path_factory.mktemp("ssh")
    servers: list[subprocess.Popen] = []
    try:
        join_namespaces(namespaces)
        resolve_hostname_to_own_address(namespaces)
        (ssh_dir / "authorized_keys").write_text(keygen(ssh_dir / "id_ed25519") + "\n")
        host_keys = [keygen(ssh_dir / f"host-{address}") for address in ADDRESSES]
        write_client_config(ssh_dir, host_keys)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        for ns, address in zip(namespaces, ADDRESSES, strict=True):
            servers.append(start_sshd(ns, address, ssh_dir))
            wait_for_ssh(servers[-1], namespaces[0], address, ssh_dir)
        yield Hosts(namespaces, ssh_dir)
    finally:
        for server in servers:
            server.kill()
            server.wait()
        for ns in namespaces:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


TIMEOUT_S = 5
# 96 steps, a checkpoint every 16: a fault at the first leaves most of the run to go (a step takes about 60 ms).
RUN = ("optim.epochs=4", "run.checkpoint_every=16", f"dist.timeout_s={TIMEOUT_S}")
MARGIN_S = 15  # start-up of the error path, and a busy 2-core machine


def ddl_train(hosts: Hosts, run_dir: Path, hostfile: Path, *flags: str) -> subprocess.Popen:
    """`ddl train` of the probe from the first host, as a user would type it there (no -np: the hostfile's slots);
    output captured."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PATH": f"{hosts.ssh_dir / 'bin'}:{os.environ['PATH']}"}
    command = [sys.executable, "-m", "ddl_apps.cli", "train", PROBE, f"run.dir={run_dir}", *RUN,
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
    print(f"{fault}: the launcher exited {seconds:.1f} s after the fault")
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
