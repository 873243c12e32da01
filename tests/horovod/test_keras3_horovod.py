"""Issue 3: Horovod's TensorFlow and Keras APIs on Keras 3 (TF 2.21), under horovodrun -np 2 with Gloo and MPI.

The worker (tests/workers/keras3_api.py) compares every result with one process on the combined batch, or
across ranks, and raises on any mismatch; here we check it ran every check to the end on both controllers.
"""

import pytest

from tests.engine_runs import launch_worker

pytestmark = pytest.mark.distributed

EXPECTED = [
    "ok broadcast_variables eager and tf.function",
    "ok DistributedGradientTape (eager)",
    "ok DistributedGradientTape (tf.function)",
    "ok DistributedGradientTape fp16 (tf.function)",
    "ok PartialDistributedGradientTape (tf.function)",
    "ok PartialDistributedGradientTape local_layers",
    "ok model.fit DistributedOptimizer fp32",
    "ok model.fit DistributedOptimizer fp16",
    "ok model.fit backward_passes_per_step=2",
    "ok DistributedOptimizer wraps Adam, AdamW, RMSprop",
    "ok LearningRateWarmupCallback reaches 0.02 at epoch 2",
    "ok MetricAverageCallback logs the mean of the ranks' metrics",
    "ok SyncBatchNormalization uses the statistics of the combined batch",
    "ok SyncBatchNormalization layers get unique names",
    "all keras3 checks passed",
]


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovod_keras3_api(controller):
    output = launch_worker("keras3_api.py", controller)
    missing = [line for line in EXPECTED if line not in output]
    assert not missing, f"missing {missing} in:\n{output[-3000:]}"
