"""A real two-host run on one machine: two network namespaces joined by a veth pair, an SSH server in each, and
`ddl train -np 2 --hostfile` launched from the first, so the second worker is started over SSH in the other host."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.engine_runs import PROBE, REPO, summary

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


def ddl_train_on_hosts(hosts: Hosts, run_dir: Path, hostfile: Path) -> subprocess.CompletedProcess:
    """`ddl train` from the first host, as a user would type it there (no -np: the hostfile's slots)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PATH": f"{hosts.ssh_dir / 'bin'}:{os.environ['PATH']}"}
    command = [sys.executable, "-m", "ddl_apps.cli", "train", PROBE, f"run.dir={run_dir}", "optim.epochs=1",
               "--hostfile", str(hostfile), "--gloo"]
    return subprocess.run(["ip", "netns", "exec", hosts.namespaces[0], *command], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)


def test_two_workers_on_two_hosts_over_ssh(two_hosts, tmp_path):
    hostfile = tmp_path / "hostfile"
    first, second = ADDRESSES  # both forms a hostfile takes (horovodrun itself reads only the first)
    hostfile.write_text(f"# two hosts, one slot each\n{first} slots=1\n{second}:1\n")
    run_dir = tmp_path / "run"

    result = ddl_train_on_hosts(two_hosts, run_dir, hostfile)

    assert result.returncode == 0, result.stdout + result.stderr
    digests = summary(run_dir)["weights_sha256_by_rank"]
    assert summary(run_dir)["workers"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    # Rank 0 runs beside the launcher on the first host; rank 1 was started by the second host's sshd, which
    # lives in the second namespace and so ran it there.
    remote = [shlex.split(c) for c in two_hosts.commands_run_by_sshd(ADDRESSES[1]) if "ddl_apps.cli" in c]
    assert len(remote) == 1
    assert {"HOROVOD_RANK=1", f"HOROVOD_HOSTNAME={ADDRESSES[1]}"} <= set(remote[0])
    assert not [c for c in two_hosts.commands_run_by_sshd(ADDRESSES[0]) if "ddl_apps.cli" in c]
