"""Run under horovodrun -np 2: a step that failed while the fused gradient group was being submitted (as when a
peer dies mid-backward in an elastic run) is undone by optimizer.load_state_dict, and the next steps match
across ranks. Rank 0 is interrupted, rank 1 is not, as an elastic survivor and a newcomer would be."""

import horovod.torch as hvd
import torch

hvd.init()
torch.manual_seed(0)
rank = hvd.rank()
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), groups=1,
                               named_parameters=model.named_parameters())
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
data, target = torch.randn(4, 8, 6, dtype=torch.float64), torch.randn(4, 8, 1, dtype=torch.float64)


def loss(step: int) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(data[step] + rank), target[step])


if rank == 0:
    def lost_peer(*_):
        raise hvd.HorovodInternalError("peer lost")

    opt._grouped_allreduce_grad_async = lost_peer
    try:
        loss(0).backward()
    except hvd.HorovodInternalError:
        pass
    del opt._grouped_allreduce_grad_async
    opt.load_state_dict(opt.state_dict())

for step in range(1, 4):
    opt.zero_grad()
    loss(step).backward()
    opt.step()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = hvd.allgather(flat.unsqueeze(0))
assert torch.equal(gathered[0], gathered[1]), "weights differ across ranks"
print(f"rank {rank}: identical after an interrupted step", flush=True)
