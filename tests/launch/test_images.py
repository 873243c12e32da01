"""Issue 35: the CPU image built from docker/Dockerfile.cpu as shipped (tests/launch/images.py says what is stood in
for) and run: as its unprivileged user, with no secret or cache in any layer, its smoke check passing, and `ddl
train` of the fraud recipe at two workers in one container and across two containers that are two hosts (a network
namespace each on one switch, the image's sshd in each, the run started over SSH as on a cluster). Slow: the first
build on a machine takes 15-20 minutes (it compiles Horovod); podman's layer cache makes a later one seconds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ddl_apps.trainers.tabular import data
from tests.engine_runs import final_weights, summary
from tests.launch import hosts, images
from tests.launch.hosts import ADDRESSES, NODES, sh
from tests.launch.images import CPU_IMAGE, PODMAN, podman, run, writable_by_the_image_user

pytestmark = pytest.mark.slow

FRAUD = ("train", "fraud_mlp", "data.rows=20000", "optim.epochs=1", "optim.batch_size=256", "optim.warmup_steps=5",
         "model.baselines=[]", "run.log_every=10")
# One thread per worker in both runs below: one container's two workers share its two cores, while a container that
# is a host of its own would give its one worker both, and a sum over threads adds in another order (a gradient's
# norm moved in its last bit, and one weight of 118,225 ended 1.06e-6 off after an epoch)
ONE_THREAD = ("-e", "OMP_NUM_THREADS=1")
SHIPPED = "datasets/ieee-cis/train.parquet"  # where a container's cache holds the table (copied, not downloaded)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds and runs images with podman, and makes network namespaces")
    log = tmp_path_factory.mktemp("build") / "build.log"
    seconds = images.build_cpu_image(log)
    print(f"\n{CPU_IMAGE}: {'built before from the same inputs' if seconds is None else f'built in {seconds:.0f} s'}")
    return CPU_IMAGE


def container_volumes(tmp: Path, runs: Path) -> tuple[str, ...]:
    """A run folder (the same on every host, as a cluster's shared file system) and a host's own dataset cache,
    both owned by the image's user."""
    cache = tmp / "cache"
    images.copy_into_cache(cache, data.shipped_path(data.IEEE_CIS), SHIPPED)
    writable_by_the_image_user(cache)
    return ("-v", f"{cache}:/home/ddl/.cache/ddl_apps", "-v", f"{runs}:/home/ddl/runs")


def test_the_image_runs_as_its_unprivileged_user_and_holds_no_secret_or_cache(image):
    config = json.loads(podman("image", "inspect", image))[0]["Config"]
    assert config["User"] == "1000:1000" and config["Entrypoint"] == ["ddl"]
    who = run(image, options=("--entrypoint", "id"))
    assert who.returncode == 0 and who.stdout.startswith("uid=1000(ddl) gid=1000(ddl) "), who.stdout + who.stderr
    # The build arguments (an index URL may carry a password) and the CA secret stayed in the build stage.
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    assert "PIP_FIND_LINKS" not in history and "127.0.0.1" not in history and "/run/secrets" not in history
    assert images.secrets_in_layers(image) == {}


def test_the_smoke_check_passes_in_the_image_and_refuses_it_as_the_gpu_image(image):
    smoke = run(image, options=("--entrypoint", "ddl-smoke"))
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert "Horovod: TensorFlow PyTorch Gloo MPI" in smoke.stdout
    assert "rank 1: allreduce on cpu = 3" in smoke.stdout and "the cpu image works: 2 workers" in smoke.stdout
    as_gpu = run(image, options=("--entrypoint", "ddl-smoke", "-e", "DDL_IMAGE=gpu"))
    assert as_gpu.returncode == 1 and "Horovod was built without NCCL" in as_gpu.stderr, as_gpu.stderr


@pytest.fixture(scope="module")
def one_container(image, tmp_path_factory) -> Path:
    """`ddl train` of the fraud recipe at two workers in one container."""
    tmp = tmp_path_factory.mktemp("one")
    runs = writable_by_the_image_user(tmp / "runs")
    trained = run(image, *FRAUD, "run.dir=runs/fraud", "-np", "2", options=(*ONE_THREAD, *container_volumes(tmp, runs)))
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    return runs / "fraud"


def test_the_fraud_recipe_at_two_workers_in_one_container(one_container):
    done = summary(one_container)
    digests = done["weights_sha256_by_rank"]
    assert done["workers"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert (one_container / "model" / "model.safetensors").is_file()
    assert 0 < done["results"]["model (test)"]["pr_auc"] <= 1


def test_the_fraud_recipe_across_two_containers_as_two_hosts_over_the_images_ssh(image, one_container,
                                                                                tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    runs = writable_by_the_image_user(tmp / "runs")
    (runs / "hostfile").write_text("".join(f"{node} slots=1\n" for node in NODES))
    containers = [f"ddl-{os.getpid()}-{node}" for node in NODES]
    with hosts.switched_namespaces(f"{os.getpid()}i") as (namespaces, _):
        try:
            for ns, node, name in zip(namespaces, NODES, containers, strict=True):
                start_host(image, name, ns, node, ssh_folder(tmp), container_volumes(tmp / node, runs))
            trained = subprocess.run([*PODMAN, "exec", *ONE_THREAD, containers[0], "ddl", *FRAUD, "run.dir=runs/fraud",
                                      "--hostfile", "runs/hostfile"], capture_output=True, text=True, timeout=600)
            logs = [sshd_log(c) for c in containers]
        finally:
            images.remove_containers(*containers)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:] + "".join(logs)
    assert "Accepted publickey for ddl" in logs[1]  # rank 1 was started over SSH in the second container
    done = summary(runs / "fraud")
    digests = done["weights_sha256_by_rank"]
    assert done["workers"] == 2 and done["hosts_by_rank"] == list(NODES) and digests[0] == digests[1]
    np.testing.assert_allclose(final_weights(runs / "fraud"), final_weights(one_container), rtol=0, atol=1e-6)


def ssh_folder(tmp: Path) -> Path:
    """What a cluster mounts at ~/.ssh (the MPI Operator's Secret): the user's key, also the host key, and
    authorized_keys."""
    ssh = tmp / "ssh"
    if not ssh.exists():
        ssh.mkdir(mode=0o700)
        sh("ssh-keygen", "-q", "-t", "rsa", "-b", "3072", "-N", "", "-C", "", "-f", str(ssh / "id_rsa"))
        shutil.copyfile(ssh / "id_rsa.pub", ssh / "authorized_keys")
        writable_by_the_image_user(ssh)
    return ssh


def start_host(image: str, name: str, ns: str, node: str, ssh: Path, volumes: tuple[str, ...]) -> None:
    """A container of `image` as the host `node`: in the network namespace `ns`, the image's sshd in front."""
    names = [f"--add-host={n}:{a}" for n, a in zip(NODES, ADDRESSES, strict=True)]
    podman("run", "-d", "--name", name, *images.CONTAINER, f"--network=ns:/run/netns/{ns}", f"--hostname={node}",
           *names, "-v", f"{ssh}:/home/ddl/.ssh", *volumes,
           "--entrypoint", "/usr/sbin/sshd", image, "-De", "-f", "/etc/ssh/ddl_apps_sshd_config")


def sshd_log(container: str) -> str:
    return subprocess.run([*PODMAN, "logs", container], capture_output=True, text=True).stderr
