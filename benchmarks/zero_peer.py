"""Under torchrun (Gloo): PyTorch's own sharded training on the text-classification recipe's model and batches,
beside the engine's ZeRO stages: `zero_redundancy` (DistributedDataParallel with ZeroRedundancyOptimizer, ZeRO
stage 1) or `fsdp2` (fully_shard on each transformer layer and the model, ZeRO stage 3). Same AdamW settings and
clipping by the global norm as the recipe. Rank 0 prints one JSON line: the median step time.

    torchrun --nproc-per-node 2 benchmarks/zero_peer.py zero_redundancy|fsdp2 --steps 6 [recipe overrides ...]
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import report  # noqa: E402
from ddl_apps.core.dist import Topology  # noqa: E402
from ddl_apps.core.feed import Feed, train_examples  # noqa: E402
from ddl_apps.core.schedule import epoch_steps, scaled_lr  # noqa: E402
from ddl_apps.recipe import load_recipe  # noqa: E402
from ddl_apps.registry import load_trainer  # noqa: E402

RECIPE = "nlp_minilm"


def wrap(model: torch.nn.Module, mode: str, make_optimizer):
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        return model, make_optimizer(model.parameters())
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    settings = make_optimizer([torch.zeros(1, requires_grad=True)])  # (its class and hyperparameters)
    accepted = inspect.signature(type(settings)).parameters
    return ddp, ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=type(settings),
                                        **{k: v for k, v in settings.defaults.items() if k in accepted})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["zero_redundancy", "fsdp2"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args, overrides = parser.parse_known_args()
    torch_dist.init_process_group("gloo")
    rank, size = torch_dist.get_rank(), torch_dist.get_world_size()
    torch.set_num_threads(max(1, torch.get_num_threads() // size))
    recipe = load_recipe(RECIPE, ["run.progress=false", *overrides])
    topology = Topology(rank, size, rank, size)
    task = load_trainer(recipe.trainer).load_hooks().build_task(recipe, topology)
    torch.manual_seed(recipe.run.seed)
    from ddl_apps.core.torch_engine import make_optimizer

    optim = recipe.optim
    lr = scaled_lr(optim, size, recipe.dist.scale_lr)
    model, optimizer = wrap(task.build_model(), args.mode, lambda params: make_optimizer(optim, params, lr))
    global_batch, _ = epoch_steps(recipe, train_examples(task.train), size)
    feed = Feed(task.train, recipe.run.seed, global_batch, optim.batch_size)
    seconds = []
    for step in range(args.warmup + args.steps):
        (micro_batches,) = feed.steps(0, step, 1, topology)
        started = time.perf_counter()
        optimizer.zero_grad()
        for batch in micro_batches:
            (task.loss(model, batch) / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad_norm)
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    report({"peer": args.mode, "workers": size, "step_s": round(statistics.median(seconds[args.warmup:]), 4)})
    torch_dist.barrier()
    torch_dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # (without the interpreter's teardown, where a Gloo thread once aborted the process)


if __name__ == "__main__":
    main()
