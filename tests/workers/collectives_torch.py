"""Run under horovodrun: PyTorch collectives give exactly the expected values."""

import horovod.torch as hvd
import torch

hvd.init()
rank, size = hvd.rank(), hvd.size()
ranks = torch.arange(size, dtype=torch.float64)

x = torch.full((3, 4), float(rank + 1), dtype=torch.float64)
assert torch.equal(hvd.allreduce(x, op=hvd.Sum), torch.full((3, 4), (ranks + 1).sum().item(), dtype=torch.float64))
assert torch.equal(hvd.allreduce(x, op=hvd.Average), torch.full((3, 4), (ranks + 1).mean().item(), dtype=torch.float64))

# allgather with a different first dimension per rank
rows = torch.full((rank + 1, 2), rank, dtype=torch.int32)
expected = torch.cat([torch.full((r + 1, 2), r, dtype=torch.int32) for r in range(size)])
assert torch.equal(hvd.allgather(rows), expected)

payload = torch.arange(5, dtype=torch.float32) * (rank + 10)
assert torch.equal(hvd.broadcast(payload, root_rank=1), torch.arange(5, dtype=torch.float32) * 11)

# alltoall: rank r sends value 100*r + dest to every destination
sent = torch.tensor([100 * rank + dest for dest in range(size)], dtype=torch.int64)
received = hvd.alltoall(sent)
assert torch.equal(received, torch.tensor([100 * src + rank for src in range(size)], dtype=torch.int64))

print(f"collectives ok on rank {rank} of {size}", flush=True)
