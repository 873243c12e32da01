"""Embedding tables sharded row-wise across Horovod workers (model parallelism), for PyTorch.

Rank r of n owns rows r, r+n, r+2n, ... of a table (interleaved, so that popular low ids spread evenly). A
lookup sends each distinct id to its owner with one alltoall; the owners gather the rows and send them back with
a second. In the backward pass the row gradients travel back the same way, scaled by 1/n, and land on the
owner's shard: a sharded table learns exactly as a replicated one whose gradients Horovod averages. The dense
rest of the model stays data-parallel. The engine keeps shards out of its allreduce and its initial broadcast,
and gathers them whole (`replicated_state`) for checkpoints and exports, so a saved model loads into the same
model built with plain tables, on any number of workers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from ddl_apps.core import dist

INIT_BLOCK_ROWS = 65_536  # tables are initialised block by block: no worker ever holds a whole one


def _alltoall(tensor: torch.Tensor, splits: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    import horovod.torch as hvd

    return hvd.synchronize(hvd.alltoall_async(tensor.contiguous(), splits, name=name))


class _ReturnRows(torch.autograd.Function):
    """Send looked-up rows back to the ranks that asked for them; the backward pass returns their gradients to
    the owner. Horovod's own differentiable alltoall names its backward collective afresh on every call, which
    churns its response cache; this one keeps fixed names."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, splits: torch.Tensor, name: str, grad_scale: float) -> torch.Tensor:
        returned, returned_splits = _alltoall(rows, splits, name)
        ctx.name, ctx.returned_splits, ctx.grad_scale = name, returned_splits, grad_scale
        return returned

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        to_owner, _ = _alltoall(grad * ctx.grad_scale, ctx.returned_splits, f"{ctx.name}.grad")
        return to_owner, None, None, None


def initial_rows(num_embeddings: int, dim: int, std: float, seed: int, rows: torch.Tensor | None = None):
    """Rows of a table initialised N(0, std²) from `seed` (all rows when `rows` is None); the same values
    whichever way the table is split."""
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for start in range(0, num_embeddings, INIT_BLOCK_ROWS):
        block = torch.randn(min(INIT_BLOCK_ROWS, num_embeddings - start), dim, generator=generator) * std
        if rows is not None:
            mine = rows[(rows >= start) & (rows < start + len(block))]
            block = block[mine - start]
        blocks.append(block)
    return torch.cat(blocks)


class ShardedEmbedding(nn.Module):
    """A table of `num_embeddings` x `embedding_dim` of which this rank holds about 1/size of the rows.

    Every rank must call forward the same number of times (it is a collective), with batches of any size,
    including empty ones. `name` must be unique among the model's tables: it names the collectives."""

    def __init__(self, name: str, num_embeddings: int, embedding_dim: int, rank: int, size: int, std: float,
                 seed: int):
        super().__init__()
        self.name, self.num_embeddings, self.embedding_dim = name, num_embeddings, embedding_dim
        self.rank, self.size = rank, size
        self.rows: torch.Tensor
        self.register_buffer("rows", torch.arange(rank, num_embeddings, size), persistent=False)
        self.weight = nn.Parameter(initial_rows(num_embeddings, embedding_dim, std, seed, self.rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        wanted, positions = torch.unique(ids.reshape(-1), return_inverse=True)
        owner = wanted % self.size
        by_owner = torch.argsort(owner, stable=True)
        splits = torch.bincount(owner, minlength=self.size).to(torch.int32).cpu()
        asked, asked_splits = _alltoall(wanted[by_owner], splits, f"ddl.shard.{self.name}.ids")
        rows = nn.functional.embedding(asked // self.size, self.weight)
        answered = _ReturnRows.apply(rows, asked_splits, f"ddl.shard.{self.name}.rows", 1.0 / self.size)
        found = torch.empty_like(answered).index_copy(0, by_owner, answered)
        return found[positions].reshape(*ids.shape, self.embedding_dim)

    def gather(self, local: torch.Tensor, key: str) -> torch.Tensor:
        """Collective: the whole table-shaped tensor whose rows this rank holds in `local` (the weight, or an
        optimizer's per-row state)."""
        import horovod.torch as hvd

        blocks = hvd.allgather(local.detach().contiguous(), name=f"ddl.shard.{self.name}.gather.{key}")
        owner_order = torch.cat([torch.arange(r, self.num_embeddings, self.size) for r in range(self.size)])
        return torch.empty_like(blocks).index_copy_(0, owner_order, blocks)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows {self.rank}::{self.size} "
                f"({len(self.rows)} here)")


def embedding_table(name: str, num_embeddings: int, embedding_dim: int, std: float, seed: int,
                    shard: tuple[int, int] | None = None) -> nn.Module:
    """A table initialised N(0, std²) from `seed`: sharded over (rank, size) when `shard` is given, else a plain
    nn.Embedding with the same initial values."""
    if shard is not None:
        return ShardedEmbedding(name, num_embeddings, embedding_dim, *shard, std=std, seed=seed)
    # from_pretrained draws nothing from torch's generator: the layers built next start the same either way
    return nn.Embedding.from_pretrained(initial_rows(num_embeddings, embedding_dim, std, seed), freeze=False)


def sharded_tables(model: nn.Module) -> Iterator[tuple[str, ShardedEmbedding]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, ShardedEmbedding))


def _weight_key(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def sharded_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [table.weight for _, table in sharded_tables(model)]


def sharded_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the sharded tables."""
    return {_weight_key(name) for name, _ in sharded_tables(model)}


def global_grad_norm(model: nn.Module) -> torch.Tensor:
    """Collective when the model has sharded tables: the norm of all gradients as if the tables were whole (the
    dense gradients are the same on every rank once allreduced; each shard's are this rank's alone)."""
    shards = {id(p) for p in sharded_parameters(model)}
    grads = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in shards]
    squares = torch.nn.utils.get_total_norm(grads).double() ** 2 if grads else torch.zeros((), dtype=torch.float64)
    if shards:
        local = [p.grad for p in sharded_parameters(model) if p.grad is not None]
        shard_square = float(torch.nn.utils.get_total_norm(local)) ** 2 if local else 0.0
        squares = squares + float(dist.allreduce_sum([shard_square])[0])
    return squares.sqrt().float()


def replicated_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the model's state dict with every sharded table gathered whole (keys as with plain tables)."""
    state = model.state_dict()
    for name, table in sharded_tables(model):
        state[_weight_key(name)] = table.gather(table.weight, "weight")
    return state


def replicated_model(model: nn.Module) -> nn.Module:
    """Collective: the model itself when nothing is sharded, else a copy whose sharded tables are plain
    nn.Embedding tables holding every row (what an export holds)."""
    tables = list(sharded_tables(model))
    if not tables:
        return model
    state = replicated_state(model)
    whole = copy.deepcopy(model)
    for name, _ in tables:
        whole.set_submodule(name, nn.Embedding.from_pretrained(state[_weight_key(name)], freeze=False))
    whole.load_state_dict(state)
    return whole


def load_replicated_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a replicated_state (or a plain model's state dict): each sharded table takes its own rows."""
    state = dict(state)
    for name, table in sharded_tables(model):
        key = _weight_key(name)
        if key in state and len(state[key]) == table.num_embeddings:
            state[key] = state[key][table.rows]
    model.load_state_dict(state)


def _per_row_state(optimizer: torch.optim.Optimizer, model: nn.Module):
    """(table, optimizer-state key by parameter index, parameter) for each sharded table."""
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    return [(table, index[id(table.weight)], table.weight) for _, table in sharded_tables(model)]


def replicated_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """Collective: the optimizer's state dict with the per-row state of sharded tables (Adam's moments, SGD's
    momentum) gathered whole."""
    state = optimizer.state_dict()
    for table, i, weight in _per_row_state(optimizer, model):
        for key, value in sorted(state["state"].get(i, {}).items()):
            if torch.is_tensor(value) and value.shape == weight.shape:  # a copy: state_dict shares the live dicts
                state["state"][i] = {**state["state"][i], key: table.gather(value, key)}
    return state


def load_replicated_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict) -> None:
    for table, i, _ in _per_row_state(optimizer, model):
        for key, value in state["state"].get(i, {}).items():
            if torch.is_tensor(value) and value.dim() and len(value) == table.num_embeddings:
                state["state"][i] = {**state["state"][i], key: value[table.rows]}
    optimizer.load_state_dict(state)
