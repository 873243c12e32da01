"""Issue 4: both engines' data parallelism is exact, and resume continues exactly where it stopped.

Each test runs for the PyTorch and the Keras 3 engine, on scikit-learn's digits with the same small MLP.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ddl_apps.core import sharding
from ddl_apps.core.checkpoint import list_checkpoints, load_state
from ddl_apps.core.metrics import read_metrics
from tests.engine_runs import (
    KILLABLE,
    PROBE,
    PROBES,
    REPO,
    ddl,
    final_weights,
    kill_training,
    launch_worker,
    start_training,
    summary,
    train,
)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module", params=sorted(PROBES))
def engine(request):
    return request.param


@pytest.fixture(scope="module")
def runs(engine, tmp_path_factory) -> Path:
    """Every run below that is not killed, launched or failed on purpose, one after another in three horovodrun jobs
    (tests/workers/probe_runs.py): a Keras worker takes 5-8 s to start, more than a probe run takes to train."""
    out = tmp_path_factory.mktemp(engine)
    for phase, workers, controller in (("np1", 1, "mpi"), ("np2", 2, "mpi"), ("gloo", 2, "gloo")):
        launch_worker("probe_runs.py", controller, np=workers, args=(str(out), PROBES[engine], phase))
    return out


@pytest.fixture(scope="module")
def reference(runs):
    """One process, batch 64: the run every data-parallel run below must reproduce."""
    return runs / "reference"


@pytest.fixture(scope="module")
def two_workers(runs):
    return runs / "two-workers"


def assert_close(actual, expected, rtol):
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rtol * scale, np.abs(actual - expected).max() / scale


def test_two_workers_equal_one_worker_with_twice_the_batch(reference, two_workers):
    assert_close(final_weights(two_workers), final_weights(reference), rtol=1e-5)


def test_weights_bit_identical_across_ranks(two_workers):
    digests = summary(two_workers)["weights_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_accumulation_equals_the_large_batch(runs, reference):
    assert_close(final_weights(runs / "accumulation"), final_weights(reference), rtol=1e-5)


def test_fp16_compression_stays_close(runs, reference):
    """fp16 gradients carry ~3 significant digits: after 96 steps the weights stay within 1 % of fp32's,
    and validation accuracy within 1 point."""
    run = runs / "compressed"
    assert_close(final_weights(run), final_weights(reference), rtol=1e-2)
    accuracy = {r: summary(r)["results"]["model (valid)"]["accuracy"] for r in (run, reference)}
    assert abs(accuracy[run] - accuracy[reference]) <= 0.01, accuracy


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_stop_and_resume_gives_the_uninterrupted_weights(runs, two_workers, controller):
    """Two workers stopped at step 37 (mid-epoch 1) with a checkpoint and no exported model, resumed on the same
    controller: the uninterrupted run's weights."""
    assert list_checkpoints(runs / f"{controller}-stopped" / "checkpoints")[-1].name == "step-00000037"
    assert not (runs / f"{controller}-stopped" / "model").exists()
    np.testing.assert_allclose(final_weights(runs / controller), final_weights(two_workers), rtol=0, atol=1e-6)


def test_a_job_killed_at_a_random_step_resumes_exactly(engine, runs, tmp_path):
    """SIGKILL the launcher and both workers once a random checkpoint exists, truncate the newest checkpoint (as a
    crash in the middle of writing one would on a file system without atomic renames), resume: the corrupt one is
    named and skipped, and the run ends with the uninterrupted run's weights."""
    run, kill_at = tmp_path / "run", random.Random().randrange(14, 126)
    with start_training(run, PROBES[engine], *KILLABLE, "-np", "2") as job:
        deadline = time.monotonic() + 300
        while (not list_checkpoints(run / "checkpoints") or list_checkpoints(run / "checkpoints")[-1].name <
               f"step-{kill_at:08d}") and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.01)
        kill_training(run)
        job.wait(timeout=60)
    checkpoints = list_checkpoints(run / "checkpoints")
    assert len(checkpoints) >= 2 and not (run / "model").exists(), f"killed after {checkpoints[-1:]}"
    newest = max((p for p in checkpoints[-1].iterdir() if p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    result = ddl("train", PROBES[engine], f"run.dir={run}", *KILLABLE, "-np", "2", "--resume")
    assert result.returncode == 0, result.stderr
    assert f"checkpoint {checkpoints[-1]} is unusable: {newest.name} does not match its checksum" in result.stderr
    assert f"resumed from {checkpoints[-2]}" in result.stderr, result.stderr
    np.testing.assert_allclose(final_weights(run), final_weights(runs / "killable"), rtol=0, atol=1e-6)


def test_bf16_mixed_precision_trains(runs, reference):
    """bf16 autocast (PyTorch) / mixed_bfloat16 policy (Keras): one process learns as well as fp32, within 3 points."""
    run = runs / "bf16"
    accuracy = {r: summary(r)["results"]["model (valid)"]["accuracy"] for r in (run, reference)}
    assert abs(accuracy[run] - accuracy[reference]) <= 0.03, accuracy


def loss_scaler_steps(run: Path) -> int:
    """The fp16 loss scaler's count of finite steps since its scale last changed, in the run's newest checkpoint
    (PyTorch: GradScaler's state; Keras: its LossScaleOptimizer's variables)."""
    newest = list_checkpoints(run / "checkpoints")[-1]
    if (newest / "training.json").exists():
        return int(load_state(newest, "training")["scaler"]["_growth_tracker"])
    import tensorflow as tf

    return int(tf.train.load_checkpoint(str(newest / "state")).get_tensor(
        "optimizer/step_counter/.ATTRIBUTES/VARIABLE_VALUE"))


def test_fp16_mixed_precision_resumes_with_its_loss_scale(runs, reference):
    """fp16 autocast with GradScaler (PyTorch) / mixed_float16 with dynamic loss scaling (Keras), on 2 workers
    stopped at step 20 and resumed: the loss scaler's state is checkpointed and restored (its count of finite
    steps goes on to 48, where Keras' started again from 0), and the run learns as well as fp32, within 3
    points."""
    run = runs / "fp16"
    assert loss_scaler_steps(runs / "fp16-stopped") == 20
    assert loss_scaler_steps(run) == 48
    accuracy = {r: summary(r)["results"]["model (valid)"]["accuracy"] for r in (run, reference)}
    assert abs(accuracy[run] - accuracy[reference]) <= 0.03, accuracy


def step_holding(example: int, epoch: int, global_batch: int = 64, seed: int = 0, examples: int = 1536) -> int:
    """The (1-based) global step in which the probe trains `example` in `epoch`."""
    position = int(np.flatnonzero(sharding.epoch_order(examples, seed, epoch) == example)[0])
    return epoch * (examples // global_batch) + position // global_batch + 1


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_nan_loss_stops_the_run_naming_its_step(engine, tmp_path, precision):
    """A NaN in one example's features, trained by one of two ranks: both stop at that step, exit code 2. Under
    fp16 the loss scaler decides overflow for all ranks together (Keras' checked each rank's own gradients, and the
    rank holding the NaN skipped the allreduce the other waited in: a hang)."""
    run = tmp_path / "run"
    result = ddl("train", PROBES[engine], f"run.dir={run}", "optim.batch_size=32", "data.nan_examples=[700]",
                 f"run.precision={precision}", "-np", "2", timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"the loss became NaN or infinite at step {step_holding(700, 0)} (epoch 1)" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (run / "model").exists()


def test_nan_steps_can_be_skipped(engine, reference, tmp_path):
    """optim.nonfinite=skip (PyTorch): the two steps holding the NaN example (one per epoch) are left out on
    both ranks, the run finishes, and it learns as well as the clean run. Keras refuses the setting."""
    run = tmp_path / "run"
    result = ddl("train", PROBES[engine], f"run.dir={run}", "optim.batch_size=32", "data.nan_examples=[700]",
                 "optim.nonfinite=skip", "-np", "2")
    if engine == "keras":
        assert result.returncode == 2 and "optim.nonfinite=skip needs the PyTorch engine" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    skipped = [line.split(":")[0] for line in result.stderr.splitlines() if "step skipped" in line]
    assert skipped == [f"step {step_holding(700, epoch)}" for epoch in (0, 1)], result.stderr
    accuracy = {r: summary(r)["results"]["model (valid)"]["accuracy"] for r in (run, reference)}
    assert abs(accuracy[run] - accuracy[reference]) <= 0.02 and np.isfinite(final_weights(run)).all(), accuracy


@pytest.mark.parametrize("trained,resumed", [(2, 1), (1, 2)])
def test_resume_on_another_worker_count_keeps_the_trained_global_batch(engine, runs, reference, two_workers, tmp_path,
                                                                       trained, resumed):
    """Stopped mid-epoch on N workers (2: at step 37; 1: at step 20), resumed on M: the steps, their examples and
    the learning rates stay the trained run's, so the weights are the uninterrupted run's."""
    recipe = PROBES[engine]
    batch = f"optim.batch_size={64 // trained}"
    run = copy_of(runs / ("mpi-stopped" if trained == 2 else "stopped-np1"), tmp_path)
    result = ddl("train", recipe, f"run.dir={run}", batch, "-np", str(resumed), "--resume")
    assert result.returncode == 0, result.stderr
    assert f"global batch stays {64 // trained} x {trained} workers x 1 = 64 examples, shared by {resumed}" \
        in result.stderr, result.stderr
    uninterrupted = two_workers if trained == 2 else reference
    assert summary(run)["steps"] == summary(uninterrupted)["steps"] == 48
    assert_close(final_weights(run), final_weights(uninterrupted), rtol=1e-5)


def test_each_checkpoint_is_written_once(tmp_path):
    """Checkpoints every 12 steps of 48-step epochs, stopping at 60: the epoch's end (48) and the stop (60) fall on
    checkpoint steps and were written twice, the second write deleting the first before its rename."""
    result = subprocess.run(
        [sys.executable, "tests/workers/checkpoint_writes.py", PROBE, f"run.dir={tmp_path / 'run'}",
         "run.checkpoint_every=12", "run.max_steps=60"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [12, 24, 36, 48, 60]


def test_resuming_at_max_steps_trains_nothing(tmp_path):
    run = train(tmp_path / "run", "run.max_steps=20")
    result = ddl("train", PROBE, f"run.dir={run}", "run.max_steps=20", "--resume")
    assert result.returncode == 0, result.stderr
    assert "run.max_steps=20 is reached at step 20: nothing to train" in result.stderr, result.stderr
    assert [p.name for p in list_checkpoints(run / "checkpoints")][-1] == "step-00000020"
    assert max(row["step"] for row in read_metrics(run)) == 20


def test_workers_with_a_share_smaller_than_their_micro_batches_train_exactly(runs):
    """batch_size 1, a global batch of 3 on 2 workers: rank 1 holds one example of each step but runs 2 micro-
    batches; its empty one gave a NaN loss and stopped the run (PyTorch; Keras' second is an example weighted 0).
    Now: the weights of one worker with batch 3."""
    assert_close(final_weights(runs / "small-np2"), final_weights(runs / "small-np1"), rtol=1e-5)


def test_a_streamed_training_split_trains_as_the_indexed_one(runs, reference):
    """The probe's training digits as a StreamSource (each worker handed only its share of each step; no __len__,
    no take): on 2 workers with batch 32, stopped mid-epoch and resumed, the weights of the indexed split on one
    worker with batch 64."""
    streamed = runs / "streamed"
    assert list_checkpoints(runs / "streamed-stopped" / "checkpoints")[-1].name == "step-00000037"
    assert summary(streamed)["steps"] == summary(reference)["steps"] == 48
    assert_close(final_weights(streamed), final_weights(reference), rtol=1e-5)


def stop_epoch(accuracies: list[float], patience: int) -> int:
    """The epoch after which early stopping must stop, from the evaluations after each epoch: the first with
    `patience` evaluations in a row that did not beat the best before them."""
    best, stale = -np.inf, 0
    for epoch, accuracy in enumerate(accuracies, 1):
        best, stale = (accuracy, 0) if accuracy > best else (best, stale + 1)
        if stale == patience:
            return epoch
    return len(accuracies)


def test_early_stopping_stops_after_its_patience_and_exports_the_best_state(runs):
    """Up to 30 epochs, patience 2: the run stops after the second evaluation in a row that did not beat the best,
    and exports (and is judged on) the best state, which equals a run of as many epochs (bit for bit)."""
    early = runs / "early"
    *after_epochs, exported = [row["accuracy"] for row in read_metrics(early) if row["split"] == "valid"]
    best_epoch = int(np.argmax(after_epochs)) + 1  # (the first of equal values: a tie is no improvement)
    done = summary(early)
    assert len(after_epochs) == stop_epoch(after_epochs, patience=2) < 30
    assert done["steps"] == 24 * len(after_epochs) and best_epoch < len(after_epochs)
    assert done["early_stopping"] == {"metric": "accuracy", "mode": "max", "patience": 2,
                                      "best": after_epochs[best_epoch - 1], "best_epoch": best_epoch,
                                      "best_step": 24 * best_epoch, "stopped_early": True}
    assert exported == after_epochs[best_epoch - 1] == done["results"]["model (valid)"]["accuracy"]
    np.testing.assert_array_equal(final_weights(early), final_weights(runs / "early-plain"))


def test_early_stopping_resumes_exactly(runs):
    """Stopped 5 steps after its best evaluation, resumed: the best state and the count of evaluations without an
    improvement come back from the checkpoint; it stops and exports as the uninterrupted run did."""
    stopped, uninterrupted = runs / "early-resumed-stopped", summary(runs / "early")
    newest = list_checkpoints(stopped / "checkpoints")[-1]
    assert newest.name == f"step-{uninterrupted['early_stopping']['best_step'] + 5:08d}"
    assert not (stopped / "model").exists()
    assert summary(runs / "early-resumed")["early_stopping"] == uninterrupted["early_stopping"]
    np.testing.assert_array_equal(final_weights(runs / "early-resumed"), final_weights(runs / "early"))
