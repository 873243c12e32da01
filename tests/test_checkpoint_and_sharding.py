"""Core building blocks: verifiable atomic checkpoints, and the data order every rank agrees on."""

import numpy as np
import pytest
import torch

from ddl_apps.core import checkpoint as ckpt
from ddl_apps.core import sharding


def write(root, step, keep=3, payload=b"weights"):
    return ckpt.write_checkpoint(root, step, lambda folder: (folder / "model.bin").write_bytes(payload), keep)


def test_checkpoints_are_complete_verified_and_pruned(tmp_path):
    for step in (10, 20, 30, 40):
        write(tmp_path, step)
    kept = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step-00000020", "step-00000030", "step-00000040"]
    assert all(ckpt.verify(p) is None for p in kept)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    write(tmp_path, 1, payload=b"good")
    newest = write(tmp_path, 2, payload=b"newer")
    (newest / "model.bin").write_bytes(b"new")  # truncated
    warnings = []
    assert ckpt.latest_valid(tmp_path, warnings.append).name == "step-00000001"
    assert "does not match its checksum" in warnings[0] and str(newest) in warnings[0]


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    def broken(folder):
        (folder / "half").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.write_checkpoint(tmp_path, 5, broken, keep=3)
    assert list(tmp_path.iterdir()) == []


def test_nested_state_round_trips_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": np.arange(5, dtype=np.uint8), "note": None}
    ckpt.save_state(tmp_path, "s", state)
    loaded = ckpt.load_state(tmp_path, "s")
    restored = torch.optim.AdamW(model.parameters())
    restored.load_state_dict(loaded["optimizer"])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(restored.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key])
    assert loaded["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    assert loaded["rng"].tolist() == [0, 1, 2, 3, 4] and loaded["note"] is None


@pytest.mark.parametrize("size,accumulation", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_ranks_split_each_global_step_without_overlap(size, accumulation):
    n, batch, seed = 1000, 16, 7
    order = sharding.epoch_order(n, seed, epoch=3)
    assert np.array_equal(order, sharding.epoch_order(n, seed, epoch=3))  # the same on every rank
    global_batch = batch * size * accumulation
    micro = sharding.micro_batches_per_step(global_batch, batch, size)
    assert micro == accumulation
    for step in range(sharding.steps_per_epoch(n, global_batch)):
        batches = [sharding.rank_step_batches(order, step, global_batch, r, size, micro) for r in range(size)]
        assert all(len(b) == batch for rank in batches for b in rank)
        global_step = order[step * global_batch : (step + 1) * global_batch]
        assert np.array_equal(np.concatenate([np.concatenate(rank) for rank in batches]), global_step)


def test_fewer_workers_share_the_same_global_step():
    """An elastic run of 4 workers' global batch on 3: the same examples, shares within one of each other."""
    order, global_batch = sharding.epoch_order(500, 1, epoch=0), 64
    micro = sharding.micro_batches_per_step(global_batch, 16, 3)
    batches = [sharding.rank_step_batches(order, 2, global_batch, r, 3, micro) for r in range(3)]
    assert micro == 2 and {len(b) for rank in batches for b in rank} <= {10, 11}
    assert np.array_equal(np.concatenate([np.concatenate(rank) for rank in batches]), order[128:192])


def test_evaluation_shards_cover_every_example_once():
    shards = [sharding.eval_shard(11, r, 3) for r in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(11))
