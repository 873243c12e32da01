"""Issue 33: the CPUs a process may use under a quota (a container, a Kubernetes pod, a SLURM job), not the host's
count, on cgroup trees written here as the kernel shows them."""

from pathlib import Path

import pytest

from ddl_apps.cpus import cgroup_cpu_quota, usable_cpus


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_tightest_quota_of_the_cgroup_and_its_parents(tmp_path):
    mountinfo = f"30 23 0:26 / {tmp_path} rw,nosuid - cgroup2 cgroup2 rw\n"
    write(tmp_path / "job" / "cpu.max", "400000 100000\n")  # the job: 4 CPUs
    write(tmp_path / "job" / "step" / "cpu.max", "max 100000\n")  # its step: no limit of its own
    assert cgroup_cpu_quota("0::/job/step\n", mountinfo) == 4.0
    write(tmp_path / "job" / "step" / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_quota("0::/job/step\n", mountinfo) == 1.5
    assert cgroup_cpu_quota("0::/other\n", mountinfo) is None


def test_cgroup_v1_reads_the_cpu_controller_of_a_hybrid_layout(tmp_path):
    mountinfo = (f"31 23 0:28 / {tmp_path} rw - tmpfs tmpfs rw\n"
                 f"32 31 0:29 / {tmp_path / 'cpu,cpuacct'} rw - cgroup cgroup rw,cpu,cpuacct\n"
                 f"33 31 0:30 / {tmp_path / 'unified'} rw - cgroup2 cgroup2 rw\n")
    cpu = tmp_path / "cpu,cpuacct" / "pod"
    write(cpu / "cpu.cfs_quota_us", "200000\n")
    write(cpu / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota("4:cpu,cpuacct:/pod\n3:memory:/pod\n0::/pod\n", mountinfo) == 2.0
    write(cpu / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota("4:cpu,cpuacct:/pod\n0::/pod\n", mountinfo) is None


def test_inside_a_container_the_cgroup_namespace_root_is_the_mount_root(tmp_path):
    """The container sees its own cgroup as /, mounted from the host's /kubepods/pod1."""
    mountinfo = f"30 23 0:26 /kubepods/pod1 {tmp_path} rw - cgroup2 cgroup2 rw\n"
    write(tmp_path / "cpu.max", "300000 100000\n")
    assert cgroup_cpu_quota("0::/kubepods/pod1\n", mountinfo) == 3.0


@pytest.mark.parametrize("quota,expected", [(None, 2), (8.0, 2), (1.5, 1), (0.5, 1)])
def test_usable_cpus_is_the_affinity_bounded_by_the_quota(monkeypatch, quota, expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("ddl_apps.cpus.cgroup_cpu_quota", lambda cgroups, mountinfo: quota)
    assert usable_cpus() == expected
