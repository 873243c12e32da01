"""Hosts on one machine for the multi-host tests and benchmarks: network namespaces on one switch (a bridge), an
SSH server in each host, and the faults a cluster sees (a host that dies, a network that partitions, a host that is
slow). Needs root."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tests.engine_runs import REPO

ADDRESSES = ("10.213.0.1", "10.213.0.2")
LOGIN_ADDRESS = "10.213.0.3"  # a third namespace, where a cluster's users log in: it launches the elastic runs
NODES = ("node1", "node2")  # the hosts' names on a cluster (SLURM's node names), known on both hosts
# One name on both ends: horovodrun looks for an interface name that every host has in common.
IFACE = "ddl0"


@dataclass
class Hosts:
    namespaces: tuple[str, str]
    login: str  # the login node's namespace
    ssh_dir: Path  # the client's config and key, and what each server ran ("commands-<address>.log")
    servers: list[subprocess.Popen] = field(default_factory=list)  # every sshd started, to stop at the end

    def start_sshd(self, which: int) -> None:
        self.servers.append(start_sshd(self.namespaces[which], ADDRESSES[which], self.ssh_dir))
        wait_for_ssh(self.servers[-1], self.login, ADDRESSES[which], self.ssh_dir)

    def user_env(self, **extra: str) -> dict[str, str]:
        """A user's environment on these hosts: the repository importable, our ssh client first on PATH (its key
        and known hosts), and `extra`."""
        return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
                "PATH": f"{self.ssh_dir / 'bin'}:{os.environ['PATH']}", **extra}

    def commands_run_by_sshd(self, address: str) -> list[str]:
        log = self.ssh_dir / f"commands-{address}.log"
        return log.read_text().splitlines() if log.exists() else []


def sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, f"{shlex.join(argv)}: {done.stderr}"


def join_namespaces(hosts: tuple[str, str], login: str) -> None:
    """A switch (a bridge in the login node) with a port for each host: each host's end is IFACE."""
    for ns in (*hosts, login):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", login, "link", "add", IFACE, "type", "bridge")
    for port, (ns, address) in enumerate(zip((*hosts, login), (*ADDRESSES, LOGIN_ADDRESS), strict=True)):
        if ns != login:
            sh("ip", "link", "add", f"port{port}", "netns", login, "type", "veth", "peer", "name", IFACE, "netns", ns)
            sh("ip", "-n", login, "link", "set", f"port{port}", "master", IFACE, "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", IFACE)
        sh("ip", "-n", ns, "link", "set", IFACE, "up")


def resolve_hostname_to_own_address(namespaces: tuple[str, ...]) -> None:
    """Give each host an /etc/hosts (`ip netns exec` mounts /etc/netns/NS/hosts over it) that maps the machine's name
    to that host's address, as on a cluster, and each node name to its host's address. Horovod 0.28.1's process-set
    Gloo contexts ignore HOROVOD_GLOO_IFACE and bind to the address of the host's name, so a name that resolves to a
    loopback address breaks cross-host runs."""
    for ns, address in zip(namespaces, (*ADDRESSES, LOGIN_ADDRESS), strict=True):
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


@contextmanager
def switched_namespaces(tag: str) -> Iterator[tuple[tuple[str, str], str]]:
    """Two hosts' namespaces and a login node's (ddl<tag>a, b and login) on one switch: (hosts, login); deleted on
    the way out."""
    namespaces, login = (f"ddl{tag}a", f"ddl{tag}b"), f"ddl{tag}login"
    try:
        join_namespaces(namespaces, login)
        yield namespaces, login
    finally:
        for ns in (*namespaces, login):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


@contextmanager
def two_hosts(top: Path, tag: str) -> Iterator[Hosts]:
    """Two hosts and a login node (switched_namespaces), an SSH server in each host; keys and logs under `top`."""
    with switched_namespaces(tag) as (namespaces, login):
        hosts = Hosts(namespaces, login, top)
        try:
            resolve_hostname_to_own_address((*namespaces, login))
            (top / "authorized_keys").write_text(keygen(top / "id_ed25519") + "\n")
            host_keys = [keygen(top / f"host-{address}") for address in ADDRESSES]
            write_client_config(top, host_keys)
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
            for which in range(len(namespaces)):
                hosts.start_sshd(which)
            yield hosts
        finally:
            for server in hosts.servers:
                server.kill()
                server.wait()


def workers_in(ns: str) -> list[int]:
    """The pids of the processes in a host's network namespace."""
    listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid in listed.split()]


def kill_host(hosts: Hosts, which: int) -> None:
    """The host's link down, then every process of the host SIGKILLed (its sshd, and the launcher on the first):
    as a host that loses its power, it says goodbye to no one (the other way round, its kernel would close its
    connections, and the peers would know at once)."""
    subprocess.run(["ip", "-n", hosts.namespaces[which], "link", "set", IFACE, "down"], check=True)
    for pid in workers_in(hosts.namespaces[which]):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def revive_host(hosts: Hosts, which: int) -> None:
    subprocess.run(["ip", "-n", hosts.namespaces[which], "link", "set", IFACE, "up"], check=True)
    hosts.start_sshd(which)


def partition(hosts: Hosts, action: str) -> None:
    """Each host's route to the other as a blackhole ('add'), or back ('del')."""
    for ns, other in zip(hosts.namespaces, reversed(ADDRESSES), strict=True):
        subprocess.run(["ip", "-n", ns, "route", action, "blackhole", other], check=True)


CPU_CGROUP = Path("/sys/fs/cgroup/cpu")  # (cgroup v1's CPU controller, as on this machine)


@contextmanager
def cpu_quota(hosts: Hosts, which: int, cores: float) -> Iterator[Path]:
    """A slow host: its processes (its sshd, and so every worker it starts) get `cores` of CPU time at most, in a CPU
    cgroup of their own; the cgroup (cpu.stat says how often it throttled them)."""
    group = CPU_CGROUP / f"ddl-slow-{hosts.namespaces[which]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text(str(int(cores * 100000)))
        for pid in workers_in(hosts.namespaces[which]):
            (group / "cgroup.procs").write_text(str(pid))
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            with suppress(ProcessLookupError):
                (CPU_CGROUP / "cgroup.procs").write_text(pid)
        group.rmdir()
