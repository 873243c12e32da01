"""How many CPUs this process may use: those its affinity allows, bounded by the CPU quota of its cgroup and of the
cgroups above it (a container's, a Kubernetes pod's or a SLURM job's limit). os.cpu_count() is the host's count."""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath


def usable_cpus() -> int:
    cpus = len(os.sched_getaffinity(0))
    try:
        quota = cgroup_cpu_quota(Path("/proc/self/cgroup").read_text(), Path("/proc/self/mountinfo").read_text())
    except OSError:  # no /proc (not Linux, or hidden): the affinity alone
        quota = None
    return max(1, min(cpus, math.floor(quota)) if quota is not None else cpus)


def cgroup_cpu_quota(cgroups: str, mountinfo: str) -> float | None:
    """The tightest CPU quota (in CPUs) of this process's cgroup and its ancestors, from /proc/self/cgroup and
    /proc/self/mountinfo as text; cgroup v2 (`cpu.max`) and v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`). None
    when nothing limits it."""
    quotas = []
    for line in cgroups.splitlines():
        _, controllers, path = line.split(":", 2)
        version = 2 if controllers == "" else 1
        if version == 1 and "cpu" not in controllers.split(","):
            continue
        mount = _mount(mountinfo, version)
        if mount is None:
            continue
        mount_point, mount_root = mount
        relative = PurePosixPath(path).relative_to(mount_root) if path.startswith(mount_root) else PurePosixPath()
        folder = Path(mount_point) / relative
        while True:
            quota = _quota(folder, version)
            if quota is not None:
                quotas.append(quota)
            if folder == Path(mount_point):
                break
            folder = folder.parent
    return min(quotas, default=None)


def _mount(mountinfo: str, version: int) -> tuple[str, str] | None:
    """(mount point, root of the mounted hierarchy) of the cgroup v2 hierarchy, or of v1's cpu controller."""
    for line in mountinfo.splitlines():
        fields, _, after = line.partition(" - ")
        fs_type, _, super_options = (after.split() + ["", "", ""])[:3]
        root, mount_point = fields.split()[3:5]
        if version == 2 and fs_type == "cgroup2":
            return mount_point, root
        if version == 1 and fs_type == "cgroup" and "cpu" in super_options.split(","):
            return mount_point, root
    return None


def _quota(folder: Path, version: int) -> float | None:
    try:
        if version == 2:
            limit, period = (folder / "cpu.max").read_text().split()
            return None if limit == "max" else int(limit) / int(period)
        quota_us = int((folder / "cpu.cfs_quota_us").read_text())
        return None if quota_us < 0 else quota_us / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
