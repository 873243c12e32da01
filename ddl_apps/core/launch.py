"""Building and running `horovodrun` command lines (the launcher side; no Horovod import here)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CONTROLLERS = ("gloo", "mpi")

ZERO_UNDER_ELASTIC = ("--elastic cannot train with dist.zero > 0: a worker that is lost takes its shard of the "
                      "training state with it, and the others' in-memory commit cannot restore it. Train with "
                      "dist.zero=0 under --elastic, or with ZeRO without --elastic (a stopped run resumes from its "
                      "sharded checkpoints with --resume, on any number of workers)")



def choose_controller(configured: str, elastic: bool, hosts: list[tuple[str, int]]) -> str:
    """The recipe's dist.controller, with `auto` resolved: MPI when every worker is on this host (Open MPI's
    shared-memory transport; BENCHMARKS.md compares the two), Gloo across hosts and for --elastic (Horovod's
    elastic mode runs on Gloo only)."""
    from ddl_apps.core.hosts import all_local

    if configured != "auto":
        return configured
    return "gloo" if elastic or (hosts and not all_local(hosts)) else "mpi"


def horovodrun_executable() -> str:
    """The horovodrun beside the running interpreter (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("horovodrun")
    if beside.exists():
        return str(beside)
    found = shutil.which("horovodrun")
    if found is None:
        raise FileNotFoundError("horovodrun not found: run 'make setup' to build and install Horovod")
    return found


@dataclass(frozen=True)
class Elastic:
    """An elastic job: between min_np and max_np workers, on the hosts a discovery command prints."""

    min_np: int
    max_np: int
    discovery: str  # a shell command printing `host:slots` lines
    lost_after_s: int  # how soon a host that stopped answering over SSH counts as lost (dist.timeout_s)
    rejoin_after_s: tuple[int, int] = (10, 300)  # a lost host's wait before it may rejoin: min, doubling up to max
    network_interface: str | None = None  # else Horovod waits for two hosts to find their common interfaces


def hostfile_discovery(hostfile: Path) -> str:
    """A discovery command that reads `hostfile` each time it runs (see core/hosts.py)."""
    return shlex.join([sys.executable, "-m", "ddl_apps.core.hosts", str(hostfile.resolve())])


def horovodrun_command(
    command: list[str],
    np: int,
    controller: str | None = None,
    hosts: str | None = None,
    elastic: Elastic | None = None,
) -> list[str]:
    """`horovodrun -np N [--gloo|--mpi] [-H ...|elastic arguments] COMMAND` (`ddl train` reads hostfiles itself)."""
    if controller is not None and controller not in CONTROLLERS:
        raise ValueError(f"controller must be one of {CONTROLLERS}, not {controller!r}")
    argv = [horovodrun_executable(), "-np", str(np)]
    if controller:
        argv.append(f"--{controller}")
    if hosts:
        argv += ["-H", hosts]
    if elastic:
        argv += ["--min-np", str(elastic.min_np), "--max-np", str(elastic.max_np),
                 "--host-discovery-script", elastic.discovery,
                 "--blacklist-cooldown-range", *map(str, elastic.rejoin_after_s)]
        if elastic.network_interface:
            argv += ["--network-interface", elastic.network_interface]
    return argv + command  # for MPI, horovodrun itself passes --allow-run-as-root


def worker_env(controller: str | None, elastic: Elastic | None, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for horovodrun: ours (os.environ and `env`) wins over the settings the core ships."""
    shipped = {}
    if controller != "gloo":  # Open MPI busy-polls while it waits for the other ranks; on a host with as many
        shipped["OMPI_MCA_mpi_yield_when_idle"] = "1"  # workers as cores that took the CPU from compute
    if elastic:
        # A host that died without a word: its workers' SSH sessions end (and the host is dropped) this soon (patch
        # python/0020), as the survivors' collectives give up on it.
        shipped["HOROVOD_SSH_ALIVE_SECONDS"] = str(elastic.lost_after_s)
        # Horovod's response cache outlives an elastic reset in the survivors but starts empty in a newcomer, so
        # they no longer agree on what a cached name means: the text recipe's state broadcast after a worker was
        # replaced sent 1,002,884 bytes where the survivor expected 16,512, and Gloo aborted both. No cache: each
        # collective is negotiated afresh.
        shipped["HOROVOD_CACHE_CAPACITY"] = "0"
    if sys.stderr.isatty():  # the workers print through a pipe: tables as wide as the user's terminal (console.py)
        shipped["COLUMNS"] = str(shutil.get_terminal_size().columns)
    return {**shipped, **os.environ, **(env or {})}


# horovodrun tags every line with its rank ("[0]<stderr>:" with Gloo, "[1,0]<stderr>:" with MPI). Only rank 0
# prints in normal operation, so its tag is noise; other ranks' lines (errors) keep theirs.
RANK_TAG = re.compile(r"^\[(?:\d+,)?\d+\]<std(?:out|err)>:")
RANK0_TAG = re.compile(r"^\[(?:\d+,)?0\]<std(?:out|err)>:")
# How horovodrun (Gloo) and mpirun name the exit code of the first worker that failed.
WORKER_EXIT = re.compile(r"Exit code:\s+(\d+)")


def run_horovod(
    command: list[str],
    np: int,
    controller: str | None = None,
    hosts: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    capture: bool = False,
    elastic: Elastic | None = None,
) -> subprocess.CompletedProcess:
    """Launch COMMAND on N Horovod workers and wait for it: output captured, or shown on stderr.

    When shown: when a worker fails, its own message is what the user needs, so horovodrun's Python traceback
    about it is left out, and the exit code is the worker's (2 for an error in the user's input)."""
    argv = horovodrun_command(command, np, controller, hosts, elastic)
    full_env = worker_env(controller, elastic, env)
    if capture:
        return subprocess.run(argv, env=full_env, timeout=timeout, text=True, capture_output=True, check=False)
    launcher_traceback: list[str] = []
    worker_exit = None
    with subprocess.Popen(argv, env=full_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout or ():
            if not RANK_TAG.match(line):  # horovodrun's (or mpirun's) own line
                found = WORKER_EXIT.search(line)
                if found and worker_exit is None:
                    worker_exit = int(found.group(1))
                if launcher_traceback or line.startswith("Traceback (most recent call last):"):
                    launcher_traceback.append(line)
                    continue
            sys.stderr.write(RANK0_TAG.sub("", line))
        returncode = proc.wait(timeout=timeout)
    if returncode != 0 and worker_exit:
        sys.stderr.write(f"a worker exited with code {worker_exit}; its message is above\n")
        returncode = worker_exit
    else:
        sys.stderr.writelines(launcher_traceback)  # a failure of the launcher itself: show all of it
    return subprocess.CompletedProcess(argv, returncode)
