"""Issues 3 and 25: Horovod's TensorFlow and Keras APIs on Keras 3 (TF 2.21), under horovodrun -np 2 with Gloo and MPI.

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
    "ok DistributedOptimizer groups=2",  # issue 32
    "ok DistributedOptimizer groups as a list",
    "ok LearningRateWarmupCallback reaches 0.02 at epoch 2",
    "ok MetricAverageCallback logs the mean of the ranks' metrics",
    "ok SyncBatchNormalization uses the statistics of the combined batch",
    "ok SyncBatchNormalization layers get unique names",
    "ok SyncBatchNormalization leaves masked steps out of its statistics",  # issue 32
    # issue 25: the rest of the Keras API
    "ok BroadcastGlobalVariablesCallback leaves local_variables alone",
    "ok tensorflow.keras.PartialDistributedOptimizer: local gradients are each worker's own",
    "ok keras.PartialDistributedOptimizer: local gradients are each worker's own",
    "ok DistributedOptimizer.register_local_var: local gradients are each worker's own",
    "ok Embedding gradients sparse_as_dense=True",
    "ok Embedding gradients sparse_as_dense=False",
    "ok LearningRateScheduleCallback staircase=True, warning that momentum correction is not applied",
    "ok LearningRateScheduleCallback staircase=False, warning that momentum correction is not applied",
    "ok KerasState: hvd.elastic.run trains from rank 0's weights, callbacks keep batch and epoch",
    "ok KerasState: restore goes back to the committed weights, optimizer variables and counters",
    "ok KerasState: sync hands rank 0's state to every worker",
    "ok hvd.elastic.run raises errors that are not Horovod's",
    "all keras3 checks passed",
]


# Slow because it must: 29 checks of Horovod's Keras API in one launch per controller.
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovod_keras3_api(controller):
    output = launch_worker("keras3_api.py", controller)
    missing = [line for line in EXPECTED if line not in output]  # (each line is the start of one the worker prints)
    assert not missing, f"missing {missing} in:\n{output[-3000:]}"


def test_keras_elastic_state_goes_on_without_a_killed_worker(tmp_path):
    """Horovod's elastic Keras API as its example uses it (tests/workers/keras_elastic.py), on two one-slot 'hosts':
    rank 1 is SIGKILLed mid-epoch; the survivor goes back to the last commit, finishes every epoch alone, and
    learns."""
    import sys

    from ddl_apps.core.launch import Elastic, hostfile_discovery, run_horovod
    from tests.engine_runs import WORKERS

    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:1\n127.0.0.1:1\n")
    marker = tmp_path / "killed"
    result = run_horovod([sys.executable, str(WORKERS / "keras_elastic.py"), str(marker)], 2, "gloo", timeout=300,
                         capture=True, elastic=Elastic(1, 2, hostfile_discovery(hosts), lost_after_s=30,
                                                 network_interface="lo"))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and marker.exists(), output[-4000:]
    finished = [line.split("finished ", 1)[1] for line in output.splitlines() if "finished rank" in line]
    assert len(finished) == 1 and finished[0].startswith("rank 0 of 1: epoch 4 batch 0 resets [1]"), output[-4000:]
    loss, first_loss = (float(finished[0].split(f"{key} ")[1].split()[0]) for key in ("loss", "first-loss"))
    assert loss < first_loss / 2, finished
