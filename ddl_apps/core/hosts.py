"""Host discovery for elastic runs: `python -m ddl_apps.core.hosts HOSTFILE` prints the hosts in HOSTFILE as
`host:slots` lines, the form Horovod's --host-discovery-script gives. Horovod runs it every few seconds, so editing
the file while a job runs adds or removes hosts.

A hostfile has one host per line: `host slots=N` (MPI's form), `host:N`, or `host` (one slot); `#` starts a
comment.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import psutil


def parse_hostfile(text: str) -> list[tuple[str, int]]:
    hosts = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host, slots = line, "1"
        if "slots=" in line:
            host, _, slots = line.partition("slots=")
        elif ":" in line:
            host, _, slots = line.partition(":")
        host = host.strip()
        if not host or not slots.strip().isdigit() or int(slots) < 1:
            raise ValueError(f"line {number}: {raw!r} is not 'host slots=N', 'host:N' or 'host'")
        hosts.append((host, int(slots)))
    return hosts


def all_local(hosts: list[tuple[str, int]]) -> bool:
    """Whether every host is this machine (then the workers talk over the loopback interface)."""
    mine = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
    try:
        return all(socket.gethostbyname(host) in mine for host, _ in hosts)
    except OSError:  # a name that does not resolve here is not this machine
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m ddl_apps.core.hosts HOSTFILE", file=sys.stderr)
        return 2
    try:
        hosts = parse_hostfile(Path(argv[0]).read_text())
    except (OSError, ValueError) as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 1
    print("\n".join(f"{host}:{slots}" for host, slots in hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
