#!/usr/bin/env bash
# ddl-smoke: what a ddl_apps image promises, checked inside it. The build runs `ddl-smoke --build` as its last step;
# run it on a node before a job there (the GPU image: `--gpus all`; the CPU image: without):
#   docker run --rm --gpus all --entrypoint ddl-smoke ddl_apps:gpu
# Checked: Horovod built with TensorFlow, PyTorch, Gloo and Open MPI, and in the GPU image (DDL_IMAGE=gpu) with NCCL;
# torch and TensorFlow are CUDA 12 builds in the GPU image and CPU builds in the CPU image; `ddl` lists its recipes.
# Not at build time (no GPU there): every GPU visible to torch, and an allreduce of two workers (or one per GPU)
# through horovodrun, on the GPUs with NCCL in the GPU image, over Gloo in the CPU image.
set -euo pipefail

fail() { printf 'ddl-smoke: %s\n' "$*" >&2; exit 1; }
kind=${DDL_IMAGE:?DDL_IMAGE (cpu or gpu) is set in the images}

report=$(horovodrun --check-build 2>&1) || fail "horovodrun --check-build failed: $report"
wanted=(TensorFlow PyTorch Gloo MPI)
[ "$kind" = cpu ] || wanted+=(NCCL)
for want in "${wanted[@]}"; do
    grep -qE "\[X\] $want\b" <<<"$report" || fail "Horovod was built without $want:
$report"
done
echo "Horovod: ${wanted[*]}"

python - "$kind" <<'PY' || fail "the frameworks are not the builds this image is for (above)"
import sys
import tensorflow as tf
import torch

gpu = sys.argv[1] == "gpu"
cuda = torch.version.cuda or ""
assert cuda.startswith("12.") if gpu else not cuda, f"torch {torch.__version__} is built for CUDA {cuda or 'none'}"
assert tf.test.is_built_with_cuda() == gpu, f"TensorFlow {tf.__version__} is built with CUDA: {not gpu}"
print(f"torch {torch.__version__} (CUDA {cuda or 'none'}), TensorFlow {tf.__version__}")
PY
ddl recipes >/dev/null || fail "ddl does not list its recipes"

[ "${1:-}" = --build ] && exit 0

workers=2
if [ "$kind" = gpu ]; then
    workers=$(python -c 'import torch; print(torch.cuda.device_count())')
    [ "$workers" -ge 1 ] || fail "no GPU is visible: start the container with --gpus all (Docker) or the NVIDIA runtime"
fi
# Each worker adds its rank + 1 on its own device: the sum is the same on every worker, or the collective is broken.
horovodrun -np "$workers" -H "localhost:$workers" --gloo python -c '
import horovod.torch as hvd, torch
hvd.init()
device = f"cuda:{hvd.local_rank()}" if torch.cuda.is_available() else "cpu"
total = hvd.allreduce(torch.tensor([hvd.rank() + 1.0], device=device), op=hvd.Sum).item()
assert total == hvd.size() * (hvd.size() + 1) / 2, total
print(f"rank {hvd.rank()}: allreduce on {device} = {total:g}")
' || fail "an allreduce of $workers workers failed (above)"
echo "ddl-smoke: the $kind image works: $workers workers"
