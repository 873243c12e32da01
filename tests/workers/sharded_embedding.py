"""Run under horovodrun -np 2: a sharded table looks up and learns exactly as a replicated one.

Each rank looks up different ids (with repeats, and one rank an empty batch once); the sharded lookups must equal
the plain table's rows, the shard's gradient must equal the rows of the replicated table's averaged gradient, and
the gathered table, a replicated copy and a reload must all give back the whole table.
"""

import horovod.torch as hvd
import torch

from ddl_apps.core import dist
from ddl_apps.core.parallel import embedding as parallel
from ddl_apps.recipe import DistConfig

topology = dist.init_torch(DistConfig(cycle_time_ms=1))
rank, size = topology.rank, topology.size
NUM, DIM = 11, 3

sharded = parallel.embedding_table("t", NUM, DIM, std=0.5, seed=7, shard=(rank, size))
plain = parallel.embedding_table("t", NUM, DIM, std=0.5, seed=7)
assert len(sharded.weight) == len(range(rank, NUM, size)), "each rank holds its interleaved rows"
assert torch.equal(sharded.weight.detach(), plain.weight.detach()[rank::size]), "same initial values"

batches = {0: [torch.tensor([[0, 3], [3, 10]]), torch.tensor([], dtype=torch.long).reshape(0, 2)],
           1: [torch.tensor([[1, 1], [2, 9], [10, 0]]), torch.tensor([[4, 5]])]}
for ids in batches[rank]:
    out = sharded(ids)
    assert out.shape == (*ids.shape, DIM)
    assert torch.equal(out, plain(ids)), f"lookup of {ids.tolist()} differs"

    # the same loss on both tables; the replicated table's gradient averaged over ranks as Horovod's optimizer does
    weights = torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape) + rank
    sharded.weight.grad = plain.weight.grad = None
    (out * weights).sum().backward()
    (plain(ids) * weights).sum().backward()
    averaged = hvd.allreduce(plain.weight.grad, op=hvd.Average, name="test.average")
    assert torch.allclose(sharded.weight.grad, averaged[rank::size], atol=1e-6), "shard gradient differs"

whole = parallel.replicated_state(torch.nn.ModuleDict({"t": sharded}))["t.weight"]
assert torch.equal(whole, plain.weight.detach())
copy = parallel.replicated_model(torch.nn.ModuleDict({"t": sharded}))
assert isinstance(copy["t"], torch.nn.Embedding) and torch.equal(copy["t"].weight.detach(), whole)

fresh = torch.nn.ModuleDict({"t": parallel.embedding_table("t", NUM, DIM, std=0.5, seed=8, shard=(rank, size))})
parallel.load_replicated_state(fresh, {"t.weight": whole})
assert torch.equal(fresh["t"].weight.detach(), whole[rank::size])
print(f"sharded embedding ok on rank {rank} of {size}", flush=True)
