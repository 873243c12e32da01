"""Core building blocks: verifiable atomic checkpoints, and the data order every rank agrees on."""

import numpy as np
import pytest
import torch

from ddl_apps.core import checkpoint as ckpt
from ddl_apps.core import sharding
from ddl_apps.core.torch_engine import TORCH_FILES


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
    ckpt.save_state(tmp_path, "s", state, TORCH_FILES)
    loaded = ckpt.load_state(tmp_path, "s", TORCH_FILES)
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
    assert np.concatenate(shards).tolist() == list(range(11))  # in order: contiguous ranges
    assert [len(s) for s in shards] == [4, 4, 3]  # rank 0's is the largest: every rank runs its batch count


def test_pruning_never_deletes_the_new_checkpoint_for_a_newer_corrupt_one(tmp_path):
    """Steps 10 and 20, 20 truncated: resume takes 10 and moves 20 aside; writing 15 with keep=1 keeps 15 (it
    deleted 10 and 15 and left only the corrupt 20)."""
    write(tmp_path, 10)
    newest = write(tmp_path, 20)
    (newest / "model.bin").write_bytes(b"w")
    warnings = []
    assert ckpt.latest_valid(tmp_path, warnings.append).name == "step-00000010"
    assert "moved it to corrupt-step-00000020" in warnings[0]
    write(tmp_path, 15, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000015"]
    assert ckpt.verify(tmp_path / "step-00000015") is None and (tmp_path / "corrupt-step-00000020").is_dir()


def test_pruning_leaves_newer_checkpoints_alone(tmp_path):
    for step in (10, 20):
        write(tmp_path, step)
    write(tmp_path, 15, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000015", "step-00000020"]


def test_rewriting_a_step_keeps_the_old_checkpoint_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    write(tmp_path, 10, payload=b"old")
    real_rename = ckpt.os.rename

    def rename(source, target):  # the new folder's rename fails (a crash at that moment)
        if str(source).startswith(str(tmp_path / ".step-00000010.")) and ".old." not in str(source):
            raise OSError("crash")
        real_rename(source, target)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(OSError, match="crash"):
        write(tmp_path, 10, payload=b"new")
    assert (tmp_path / "step-00000010" / "model.bin").read_bytes() == b"old"
    assert ckpt.verify(tmp_path / "step-00000010") is None
    monkeypatch.setattr(ckpt.os, "rename", real_rename)
    write(tmp_path, 10, payload=b"new")
    assert (tmp_path / "step-00000010" / "model.bin").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000010"]


def test_bucketed_epochs_drop_random_examples_not_the_longest():
    """1,000 examples of distinct lengths in global batches of 96: 40 are left out of each epoch. They are a random
    few (mean length about the middle), not the longest of the last window (which were always the 40 longest)."""
    lengths, batch = np.arange(1000), 96
    dropped = []
    for epoch in range(200):
        order = sharding.bucketed_order(lengths, seed=0, epoch=epoch, global_batch=batch)
        assert sorted(order.tolist()) == list(range(1000))
        steps = order[: len(order) // batch * batch].reshape(-1, batch)
        assert all(np.ptp(lengths[step]) < 200 for step in steps)  # still bucketed by length
        dropped.extend(order[len(order) // batch * batch :].tolist())
    assert 400 < np.mean(lengths[dropped]) < 600
    assert len(set(dropped)) > 900  # nearly every example is left out of some epoch


def test_a_share_smaller_than_the_micro_batches_gets_no_empty_one():
    """batch_size 1 and a global batch of 3 on 2 workers: 2 micro-batches each, but rank 1 holds one example."""
    order = np.arange(30)
    micro = sharding.micro_batches_per_step(3, 1, 2)
    batches = [sharding.rank_step_batches(order, 4, 3, rank, 2, micro) for rank in range(2)]
    assert [[b.tolist() for b in rank] for rank in batches] == [[[12], [13]], [[14]]]
