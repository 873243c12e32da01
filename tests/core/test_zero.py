"""Issue 36: ZeRO stages 1-3 train the weights that replicated training trains, hold a worker's share of the state,
and checkpoint it in shards that load into any number of workers, with ZeRO or without.

Every run is the probe (digits, an MLP) in units of 262 floats, so stage 3 gathers each layer on its own; the
runs share two horovodrun jobs (tests/workers/zero_runs.py), one run after another in the same workers."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from ddl_apps.core import checkpoint as ckpt
from tests.engine_runs import PROBE, ddl, launch_worker

pytestmark = pytest.mark.distributed
UNIT_BYTES = int(0.001 * 2**20)  # dist.zero_bucket_mb=0.001 in every run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero")
    launch_worker("zero_runs.py", "gloo", np=2, args=(str(out), "np2"))
    launch_worker("zero_runs.py", "gloo", np=1, args=(str(out), "np1"))
    return out


def weights(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "model" / "model.safetensors"))


def relative_difference(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(actual[k] - expected[k]).max() / np.abs(expected[k]).max()) for k in expected)


def held(run: Path) -> list[dict[str, int]]:
    return json.loads((run / "summary.json").read_text())["parameter_bytes_by_rank"]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_the_replicated_weights(runs, optimizer, stage):
    """With accumulation 2 and clipping by the global norm: the same weights as dist.zero=0 at np=2 and as one
    worker with twice the batch (relative 1e-5), identical on both ranks."""
    zero = runs / f"{optimizer}-zero{stage}"
    assert relative_difference(weights(zero), weights(runs / f"{optimizer}-zero0")) < 1e-5
    assert relative_difference(weights(zero), weights(runs / f"{optimizer}-np1")) < 1e-5
    digests = json.loads((zero / "summary.json").read_text())["weights_sha256_by_rank"]
    assert len(digests) == 2 and len(set(digests)) == 1


@pytest.mark.parametrize(("variant", "stage", "tolerance"), [
    ("fp16", 3, 1e-5),  # fp16 autocast, its loss scaler stepping the shards
    ("skip", 2, 1e-5),  # steps with NaN gradients left out (optim.nonfinite=skip)
    # bf16 rounds the forward pass: the last bits that clipping's norm changes (1e-7) flip roundings later on
    ("bf16", 2, 1e-3),
    # fp16 gradients, reduce-scattered instead of allreduced: they round differently (compression moves the
    # weights 2e-4 from uncompressed ones)
    ("compressed", 3, 1e-3),
])
def test_zero_keeps_what_the_engine_does(runs, variant, stage, tolerance):
    assert relative_difference(weights(runs / f"{variant}-zero{stage}"), weights(runs / f"{variant}-zero0")) < tolerance


def test_compression_and_skipped_steps_take_effect(runs):
    assert relative_difference(weights(runs / "compressed-zero3"), weights(runs / "sgd-zero3")) > 1e-5
    assert relative_difference(weights(runs / "skip-zero2"), weights(runs / "sgd-zero2")) > 1e-3


def test_each_worker_holds_its_share_of_the_state(runs):
    whole = held(runs / "adamw-np1")[0]
    for stage in (1, 2, 3):
        for rank in held(runs / f"adamw-zero{stage}"):
            assert abs(rank["optimizer_state"] - whole["optimizer_state"] / 2) <= UNIT_BYTES
            halved = {1: [], 2: ["gradients"], 3: ["gradients", "parameters"]}[stage]
            for part in ("gradients", "parameters"):
                expected = whole[part] / 2 if part in halved else whole[part]
                assert abs(rank[part] - expected) <= UNIT_BYTES, (stage, part, rank)


def test_a_stage3_checkpoint_is_written_in_shards(runs):
    checkpoint = ckpt.list_checkpoints(runs / "stopped" / "checkpoints")[-1]
    files = {path.name for path in checkpoint.iterdir()}
    assert {"zero.json", "zero-rank-00000.safetensors", "zero-rank-00001.safetensors"} <= files
    assert "model.safetensors" not in files  # no worker gathered the whole model
    assert ckpt.verify(checkpoint) is None  # the manifest holds every rank's file
    shard = load_file(str(checkpoint / "zero-rank-00001.safetensors"))
    assert {key.split(".", 1)[1] for key in shard} == {"param", "exp_avg", "exp_avg_sq"}


def test_a_stage3_checkpoint_resumes_exactly_and_loads_anywhere(runs):
    uninterrupted = weights(runs / "adamw-zero3")
    assert relative_difference(weights(runs / "resumed-np2"), uninterrupted) == 0
    for resumed in ("resumed-np1-zero3", "resumed-np1-zero0"):
        assert relative_difference(weights(runs / resumed), uninterrupted) < 1e-5, resumed


def test_a_replicated_checkpoint_loads_into_zero(runs):
    """A dist.zero=0 checkpoint resumed with stage 3 on one worker ends with the uninterrupted run's weights."""
    assert relative_difference(weights(runs / "replicated-np1-zero3"), weights(runs / "adamw-zero0")) < 1e-5


def test_elastic_training_refuses_zero(tmp_path):
    result = ddl("train", PROBE, f"run.dir={tmp_path / 'run'}", "dist.zero=2", "--elastic", "-np", "2")
    assert result.returncode == 2
    assert "--elastic cannot train with dist.zero > 0" in result.stderr
    assert not (tmp_path / "run").exists()


def test_shards_are_written_as_safetensors_files(tmp_path):
    """A worker's shard is streamed tensor by tensor (no second copy in memory) in safetensors' own format."""
    import torch
    from safetensors.torch import load_file as load_torch

    from ddl_apps.core.parallel.zero_checkpoint import stream_safetensors

    tensors = {"0.param": torch.randn(5), "0.exp_avg": torch.randn(7), "1.param": torch.randn(3).bfloat16()}
    stream_safetensors(tensors, tmp_path / "shard.safetensors")
    loaded = load_torch(str(tmp_path / "shard.safetensors"))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_a_worker_out_of_memory_says_what_it_holds_and_how_to_hold_less():
    from ddl_apps.core.training import memory_named
    from ddl_apps.errors import TrainingError
    from ddl_apps.recipe import load_recipe

    recipe = load_recipe(PROBE, ["dist.zero=1"])
    with pytest.raises(TrainingError) as raised, memory_named(recipe, rank=1):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4194304 bytes.")
    message = str(raised.value)
    assert message.startswith("rank 1 ran out of memory")
    assert "its shard of the optimizer state" in message and "dist.zero=3" in message
    with pytest.raises(RuntimeError, match="shape mismatch"), memory_named(recipe, rank=0):  # others pass through
        raise RuntimeError("shape mismatch")


def test_the_keras_engine_refuses_zero():
    from ddl_apps.core.tf_engine import KerasEngine
    from ddl_apps.errors import RecipeError
    from ddl_apps.recipe import load_recipe
    from tests.engine_runs import PROBES

    with pytest.raises(RecipeError, match="the Keras engine keeps it whole on every worker: set dist.zero=0"):
        KerasEngine.check_recipe(load_recipe(PROBES["keras"], ["dist.zero=2"]), None, 2)


def test_early_stopping_is_refused_with_zero():
    from ddl_apps.core.torch_engine import TorchEngine
    from ddl_apps.errors import RecipeError
    from ddl_apps.recipe import load_recipe

    recipe = load_recipe(PROBE, ["dist.zero=1", "run.early_stopping.metric=accuracy"])
    with pytest.raises(RecipeError, match="keeps a copy of the whole model on every worker, which dist.zero shards"):
        TorchEngine.check_recipe(recipe, None, 2)


def test_stage3_units_are_modules_and_leave_shared_and_frozen_parameters_whole():
    """Units bottom-up by size; a tied weight stays whole (several modules read it), a frozen one is no unit's."""
    import torch

    from ddl_apps.core.parallel.zero import _module_units

    embed, head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50, bias=False)
    head.weight = embed.weight  # tied
    model = torch.nn.Sequential(embed, torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), head, torch.nn.LayerNorm(8))
    model[4].bias.requires_grad_(False)
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    units, rest = _module_units(model, trainable, bucket_numel=72)
    assert [[name for name, _ in params] for _, params in units] == [["1.weight", "1.bias"], ["2.weight", "2.bias"]]
    assert [name for name, _ in rest] == ["0.weight", "4.weight"]
