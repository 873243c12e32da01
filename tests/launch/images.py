"""The project's OCI images built and run on this machine with podman (no Docker daemon here, no image registry
reachable): the Dockerfiles as shipped, their base image stood in for (a debootstrapped Debian with Debian's Python,
tagged with the base's name) and pip pointed through the Dockerfiles' build arguments at what this machine reaches.
Podman runs with runc (its default crun refuses this machine's cgroup layout), with rlimits at or under the current
ones (raising one is not permitted here) and the Docker image format (the OCI format drops SHELL). Needs root."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ddl_apps.cache import cache_dir
from tests.engine_runs import REPO

PODMAN = ("podman", "--runtime", "runc")
LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
CONTAINER = (*LIMITS, "--shm-size=1g")  # what a container of the images is started with (as docker run --shm-size)
BASE = "docker.io/library/python:3.11.13-slim-bookworm"  # the FROM of docker/Dockerfile.cpu
MINBASE = "localhost/ddl-bookworm-minbase"
STANDIN = Path(__file__).with_name("images") / "python-slim-standin.Containerfile"
CPU_IMAGE = "localhost/ddl_apps:cpu"
USER = (1000, 1000)  # the images' user, who must own what is mounted for writing


def podman(*args: str, timeout: float = 300) -> str:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"podman {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


def exists(image: str) -> bool:
    return subprocess.run([*PODMAN, "image", "exists", image]).returncode == 0


def standin_base() -> None:
    """The Dockerfiles' base image, stood in for once per machine (about a minute): Debian's minimal bookworm from
    the Debian archive, imported, then the stand-in's Containerfile on it."""
    if exists(BASE):
        return
    if not exists(MINBASE):
        with tempfile.TemporaryDirectory() as rootfs:
            done = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", rootfs,
                                   "http://deb.debian.org/debian"], capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            imported = subprocess.run([*PODMAN, "import", "-", MINBASE], stdin=tar.stdout, capture_output=True)
            assert tar.wait() == 0 and imported.returncode == 0, imported.stderr
    podman("build", "--network=host", *LIMITS, "-f", str(STANDIN), "-t", BASE, str(STANDIN.parent), timeout=900)


# A build argument's value is part of the build cache's key: the wheels' URL must be the same at every build.
WHEELS_PORT = 38765


@contextmanager
def served(folder: Path) -> Iterator[None]:
    """`folder` over HTTP on the loopback address (which a build with the host's network reaches), at WHEELS_PORT."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELS_PORT), handler)
    except OSError as e:
        raise AssertionError(f"cannot serve the wheels for the image build on port {WHEELS_PORT}: {e}") from e
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


def cpu_torch_wheel() -> Path:
    """A folder with the CPU build of torch that this machine's pip finds (PyPI's is a CUDA build, and PyTorch's
    CPU index, the Dockerfile's default, is not reachable here)."""
    folder = cache_dir("images", "wheels")
    if not list(folder.glob("torch-2.13.0*.whl")):
        done = subprocess.run(["pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(folder),
                               "torch==2.13.0"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    return folder


def build_cpu_image(log: Path) -> float | None:
    """docker/Dockerfile.cpu built as shipped into CPU_IMAGE; the seconds it took, or None where the image was
    already built from the same inputs (podman checks even a cached build's 3.5 GB environment layer, for 40 s).
    The build's output goes to `log`."""
    standin_base()
    wheels = cpu_torch_wheel()
    arguments = ("--build-arg", "TORCH_INDEX=", "--build-arg", f"PIP_FIND_LINKS=http://127.0.0.1:{WHEELS_PORT}/")
    inputs = build_inputs_digest(REPO / "docker" / "Dockerfile.cpu", arguments, wheels)
    record = cache_dir("images") / "ddl_apps-cpu.inputs"
    if exists(CPU_IMAGE) and record.exists() and record.read_text() == f"{inputs} {image_id(CPU_IMAGE)}":
        return None
    start = time.monotonic()
    with served(wheels), open(log, "w") as out:
        done = subprocess.run([*PODMAN, "build", "--format", "docker", "--network=host", *LIMITS, *arguments,
                               "--secret", f"id=ca,src={trusted_certificates()}",
                               "-f", str(REPO / "docker" / "Dockerfile.cpu"), "-t", CPU_IMAGE, str(REPO)],
                              stdout=out, stderr=subprocess.STDOUT, timeout=3600)
    assert done.returncode == 0, log.read_text()[-4000:]
    record.write_text(f"{inputs} {image_id(CPU_IMAGE)}")
    return time.monotonic() - start


def image_id(image: str) -> str:
    return json.loads(podman("image", "inspect", image))[0]["Id"]


def build_inputs_digest(dockerfile: Path, arguments: tuple[str, ...], wheels: Path) -> str:
    """A digest of what an image is built from: its base, the Dockerfile, the build arguments, the wheels served,
    and every file of the build context (those git sees, less what .dockerignore leaves out), with its mode."""
    digest = hashlib.sha256(f"{image_id(BASE)} {arguments} {sorted(os.listdir(wheels))}".encode())
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for name in sorted({dockerfile.relative_to(REPO).as_posix(), *listed}):
        path = REPO / name
        if name and path.is_file() and not dockerignored(name, patterns):
            digest.update(f"{name} {path.stat().st_mode:o}\n".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def dockerignored(name: str, patterns: list[str]) -> bool:
    """Whether a .dockerignore's patterns (of the forms it uses: a path, or **/ and a name) leave `name` out."""
    parts = name.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(any(fnmatch.fnmatch(part, pattern[3:]) for part in parts) if pattern.startswith("**/")
               else any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes) for pattern in patterns)


def trusted_certificates() -> str:
    """The CA certificates this machine's pip trusts (here, those of the proxy that re-signs TLS): the build's
    secret `ca`."""
    return os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"


def writable_by_the_image_user(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for folder, _, files in os.walk(path):
        for name in (folder, *(os.path.join(folder, f) for f in files)):
            os.chown(name, *USER)
    return path


def run(image: str, *args: str, options: tuple[str, ...] = (), timeout: float = 600) -> subprocess.CompletedProcess:
    """A container of `image` with `args`, as `docker run --rm --shm-size=1g` would run it here."""
    return subprocess.run([*PODMAN, "run", "--rm", *CONTAINER, *options, image, *args],
                          capture_output=True, text=True, timeout=timeout)


def layer_folders(image: str) -> list[Path]:
    """Each layer of `image` as its folder in podman's overlay storage (the files that layer added or changed)."""
    driver = json.loads(podman("image", "inspect", image))[0]["GraphDriver"]["Data"]
    lower = driver.get("LowerDir", "")
    return [Path(p) for p in [*lower.split(":"), driver["UpperDir"]] if p]


# What no layer may hold: a private key (its PEM header and body: programs that read keys hold the header alone), an
# AWS access key (but AWS's documented examples) or a GitHub token; credential files, SSH keys (a host key made by a
# package's installation included), the build's secrets mount, and the caches that builds leave behind.
SECRET = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=]{40}"
                    rb"|(?<![A-Za-z0-9+/])(?:AKIA|ASIA)(?![A-Z0-9]*EXAMPLE)[A-Z0-9]{16}(?![A-Za-z0-9+/=])"
                    rb"|gh[pousr]_[A-Za-z0-9]{36}")
SECRET_PATHS = re.compile(r"(^|/)(\.ssh|root/\.cache|\.cache/pip|\.cache/ddl_apps|\.netrc|\.pypirc|pip\.conf"
                          r"|\.git-credentials|\.docker/config\.json|id_rsa|id_ed25519|ssh_host_\w+_key|run/secrets)($|/)")


# Python packages ship keys for their own tests; nothing of ours or of the build is among them.
PACKAGE_TESTS = re.compile(r"site-packages/[^/]+/(.+/)?tests?/")


def secrets_in(folder: Path) -> list[str]:
    """Files of a layer that look like secrets (by name, or content of files under 1 MiB), package tests aside."""
    found = []
    for parent, _, files in os.walk(folder):
        for name in files:
            path = Path(parent) / name
            relative = str(path.relative_to(folder))
            if PACKAGE_TESTS.search(relative) or path.is_symlink() or not path.is_file():
                continue
            if SECRET_PATHS.search(relative):
                found.append(relative)
            elif path.stat().st_size < 1 << 20 and SECRET.search(path.read_bytes()):
                found.append(relative)
    return found


def secrets_in_layers(image: str) -> dict[str, list[str]]:
    """secrets_in() of every layer of `image`. A layer never changes, so a layer found clean is not read again (the
    environment's, 3.5 GB, is the same from one build to the next): its id is kept in the cache, with the patterns."""
    patterns = hashlib.sha256(repr((SECRET, SECRET_PATHS, PACKAGE_TESTS)).encode()).hexdigest()[:16]
    clean_file = cache_dir("images") / f"clean-layers-{patterns}.txt"
    clean = set(clean_file.read_text().split()) if clean_file.exists() else set()
    found = {str(layer): secrets_in(layer) for layer in layer_folders(image) if layer.parent.name not in clean}
    clean |= {Path(layer).parent.name for layer, files in found.items() if not files}
    clean_file.write_text("\n".join(sorted(clean)))
    return {layer: files for layer, files in found.items() if files}


def remove_containers(*names: str) -> None:
    subprocess.run([*PODMAN, "rm", "--force", "--time", "0", *names], capture_output=True)


def copy_into_cache(cache: Path, source: Path, relative: str) -> None:
    target = cache / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
