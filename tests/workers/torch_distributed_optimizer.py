"""Run under horovodrun: a few steps of hvd.DistributedOptimizer give bit-identical weights on every rank,
equal to one process training on the combined batch. Prints the max deviation from that reference."""

import copy

import horovod.torch as hvd
import torch

hvd.init()
torch.manual_seed(0)  # same data and initial model on every rank, on purpose
rank, size = hvd.rank(), hvd.size()
per_rank, steps = 8, 5

model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
reference = copy.deepcopy(model)
data = torch.randn(steps, per_rank * size, 6, dtype=torch.float64)
target = torch.randn(steps, per_rank * size, 1, dtype=torch.float64)

opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                               named_parameters=model.named_parameters())
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
mine = slice(rank * per_rank, (rank + 1) * per_rank)
for step in range(steps):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(data[step, mine]), target[step, mine]).backward()
    opt.step()
    ref_opt.zero_grad()
    torch.nn.functional.mse_loss(reference(data[step]), target[step]).backward()
    ref_opt.step()

flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = hvd.allgather(flat.unsqueeze(0))
assert all(torch.equal(gathered[0], gathered[r]) for r in range(size)), "weights differ across ranks"
ref_flat = torch.cat([p.detach().flatten() for p in reference.parameters()])
deviation = (flat - ref_flat).abs().max().item()
assert deviation < 1e-10, f"weights deviate from the single-process reference by {deviation}"
print(f"rank {rank}: identical across {size} ranks; max deviation from single process {deviation:.2e}", flush=True)
