"""ZeRO (Rajbhandari et al., 2020) for PyTorch on Horovod's collectives: training state that no worker holds whole.

The replicated parameters are grouped into units, each flattened into one vector padded to a multiple of the
worker count; rank r owns the r-th contiguous slice of every unit (its shard), and the optimizer steps only the
shards. Stage 1 allreduces the gradients and steps the shard (the optimizer state is sharded); stage 2 reduce-
scatters each unit's gradients as soon as they are all computed, so a worker keeps only its shard of them; stage 3
also frees each unit's whole parameters outside its forward and backward pass: a unit is all-gathered when its
module is called and when the gradient reaches its output, and freed after (its storage resized to nothing, so
the tensors autograd saved come back with the gather). After the step, the units whose parameters stay whole
(every unit in stages 1 and 2; in stage 3 the parameters no unit module holds) are all-gathered in one round.

Units are buckets of about `dist.zero_bucket_mb` in the parameters' order for stages 1 and 2; for stage 3, the
smallest modules (taken bottom-up) whose parameters not yet in a unit reach that size, so each is gathered
once per pass; a parameter used by more than one module stays whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ddl_apps.core import dist

FLOAT_BYTES = 4
IN_FLIGHT = 2  # stages 2 and 3: units reduce-scattered at once (each holds its whole gradients meanwhile)


@dataclass(eq=False)
class Unit:
    """Parameters flattened into `full` (padded to a multiple of the worker count); `shard` is this rank's slice,
    the parameter the optimizer steps."""

    index: int
    names: list[str]
    params: list[nn.Parameter]
    whole: bool  # parameters kept whole between passes (stage 3: False, except for the parameters no unit holds)
    rank: int
    size: int
    full: torch.Tensor = field(init=False)
    shard: nn.Parameter = field(init=False)
    gathered: bool = True
    pinned: bool = False  # gathered for good (the end of the run: digests, export)
    ready: int = 0  # parameters whose gradient this backward pass has accumulated
    launched: bool = False  # this pass's collective on the gradients has started
    handle: int | None = None
    grad_buffer: torch.Tensor | None = None  # stage 1: the gradients' flat vector, each parameter's .grad a view

    def __post_init__(self) -> None:
        numel = sum(p.numel() for p in self.params)
        self.padded = math.ceil(numel / self.size) * self.size
        first = self.params[0]
        self.full = torch.zeros(self.padded, dtype=first.dtype, device=first.device)
        offset = 0
        for p in self.params:
            self.full[offset:offset + p.numel()].copy_(p.detach().flatten())
            p.data = self.full[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        mine = self.full[self.shard_range()]
        self.shard = nn.Parameter(mine if self.whole else mine.clone())
        if not self.whole:
            self.free()

    @property
    def shard_numel(self) -> int:
        return self.padded // self.size

    def shard_range(self) -> slice:
        return slice(self.rank * self.shard_numel, (self.rank + 1) * self.shard_numel)

    def offsets(self) -> Iterator[tuple[str, nn.Parameter, int]]:
        """(name, parameter, its offset in the flat vector) in order."""
        offset = 0
        for name, p in zip(self.names, self.params, strict=True):
            yield name, p, offset
            offset += p.numel()

    def keep_gradients_flat(self) -> None:
        """Stage 1: the gradients accumulate straight into one flat vector (autograd adds into an existing .grad),
        which the allreduce then averages in place: no copy each step."""
        self.grad_buffer = torch.zeros_like(self.full)
        for _, p, offset in self.offsets():
            p.grad = self.grad_buffer[offset:offset + p.numel()].view_as(p)

    def repoint(self, flat: torch.Tensor) -> None:
        """Make `flat` (the gathered parameters) the unit's storage, the parameters and the shard its views."""
        self.full = flat
        for _, p, offset in self.offsets():
            p.data = flat[offset:offset + p.numel()].view_as(p)
        self.shard.data = flat[self.shard_range()]

    def flat_grad(self) -> torch.Tensor:
        """The unit's gradients as one padded vector (zeros for a parameter this pass did not reach)."""
        if self.grad_buffer is not None:
            return self.grad_buffer
        flat = torch.zeros(self.padded, dtype=self.full.dtype, device=self.full.device)
        for _, p, offset in self.offsets():
            if p.grad is not None:
                flat[offset:offset + p.numel()].copy_(p.grad.flatten())
        return flat

    def gather(self, hvd) -> None:
        if self.gathered:
            return
        self.full.untyped_storage().resize_(self.padded * self.full.element_size())
        self.full.copy_(hvd.allgather(self.shard.detach(), name=f"zero.gather.{self.index}"))
        self.gathered = True

    def free(self) -> None:
        if self.whole or self.pinned or not self.gathered:
            return
        self.full.untyped_storage().resize_(0)
        self.gathered = False


def _buckets(named: list[tuple[str, nn.Parameter]], bucket_numel: int) -> list[list[tuple[str, nn.Parameter]]]:
    buckets: list[list[tuple[str, nn.Parameter]]] = [[]]
    filled = 0
    for name, p in named:
        if filled >= bucket_numel:
            buckets.append([])
            filled = 0
        buckets[-1].append((name, p))
        filled += p.numel()
    return [b for b in buckets if b]


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward  # (ModuleList and ModuleDict are never called)


def _module_units(model: nn.Module, params: dict[int, str], bucket_numel: int
                  ) -> tuple[list[tuple[nn.Module, list[tuple[str, nn.Parameter]]]], list[tuple[str, nn.Parameter]]]:
    """Stage 3: (module, its parameters) for each unit module, bottom-up, and the parameters left whole."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    shared = {pid for pid, count in owners.items() if count > 1}
    claimed: set[int] = set()
    units = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            visit(child)
        if module is model or not _has_forward(module):
            return
        mine = [(params[id(p)], p) for p in module.parameters()
                if id(p) in params and id(p) not in claimed and id(p) not in shared]
        if sum(p.numel() for _, p in mine) >= bucket_numel:
            units.append((module, mine))
            claimed.update(id(p) for _, p in mine)

    visit(model)
    rest = [(params[id(p)], p) for p in model.parameters() if id(p) in params and id(p) not in claimed]
    return units, rest


def tensor_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of an optimizer's state tensors (Adam's moments, SGD's momentum)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v))


TABLES_REFUSAL = ("dist.zero cannot be combined with sharded embedding tables (model.model_parallel): the tables "
                  "already hold each row on one worker only, and they are nearly all of the model's parameters. Set "
                  "dist.zero=0, or model.model_parallel=false to shard the whole model with ZeRO")


class ZeroOptimizer:
    """The optimizer of a ZeRO stage: `inner` steps the shards; the engine calls it as it calls Horovod's
    DistributedOptimizer (zero_grad, backward passes, synchronize, step)."""

    def __init__(self, hvd, model: nn.Module, stage: int, make_inner, bucket_mb: float,
                 fp16_compression: bool = False, agree_on_overflow: bool = False):
        """`make_inner`: the torch optimizer for a list of parameters; `agree_on_overflow`: a loss scaler steps it,
        so a non-finite gradient on one worker makes every worker skip the step."""
        self.hvd, self.stage = hvd, stage
        self.fp16_compression, self.agree_on_overflow = fp16_compression, agree_on_overflow
        rank, size = hvd.rank(), hvd.size()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        bucket_numel = max(1, int(bucket_mb * 2**20 / FLOAT_BYTES))
        self.units: list[Unit] = []
        if stage == 3:
            modules, rest = _module_units(model, {id(p): n for n, p in named}, bucket_numel)
            for module, params in modules:
                unit = self._add_unit(params, whole=False, rank=rank, size=size)
                self._hook_module(module, unit)
            if rest:
                self._add_unit(rest, whole=True, rank=rank, size=size)
        else:
            for bucket in _buckets(named, bucket_numel):
                self._add_unit(bucket, whole=True, rank=rank, size=size)
        if stage == 1:
            for unit in self.units:
                unit.keep_gradients_flat()
        self.inner: torch.optim.Optimizer = make_inner([u.shard for u in self.units])
        self.backward_passes_per_step = 1
        self.in_flight: list[Unit] = []  # stages 2 and 3: units whose gradients are being reduce-scattered
        self.allreduced: tuple[int, list[torch.Tensor]] | None = None  # stage 1: the step's collective
        self.passes = 0  # backward passes done since zero_grad
        self.synchronized = False
        self._callback_queued = False
        for unit in self.units:
            for p in unit.params:
                p.register_post_accumulate_grad_hook(self._grad_hook(unit))

    def _add_unit(self, named: list[tuple[str, nn.Parameter]], whole: bool, rank: int, size: int) -> Unit:
        unit = Unit(len(self.units), [n for n, _ in named], [p for _, p in named], whole, rank, size)
        self.units.append(unit)
        return unit

    # ---- stage 3: gather a unit's parameters for its module's forward and backward -----------------------
    def _hook_module(self, module: nn.Module, unit: Unit) -> None:
        def before(_module, _args):
            unit.gather(self.hvd)

        def regather(_grad: torch.Tensor) -> None:
            unit.gather(self.hvd)

        def after(_module, _args, output):
            if torch.is_grad_enabled():
                for tensor in torch.utils._pytree.tree_leaves(output):
                    if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                        tensor.register_hook(regather)
            unit.free()

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    # ---- gradients ----------------------------------------------------------------------------------
    def _last_pass(self) -> bool:
        return self.passes + 1 >= self.backward_passes_per_step

    def _grad_hook(self, unit: Unit):
        def hook(_param: torch.Tensor) -> None:
            if not self._callback_queued:  # once per backward pass: what the pass did not reach, at its end
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_pass)
            unit.ready += 1
            if unit.ready == len(unit.params) and self.stage > 1:
                self._launch(unit)
        return hook

    def _launch(self, unit: Unit) -> None:
        """Stages 2 and 3: start reduce-scattering a unit's gradients, once all are computed (or at the end of the
        pass), into the shard, which accumulates them over the passes of a step."""
        if unit.launched:
            return
        unit.launched = True
        flat = unit.flat_grad()
        if self.fp16_compression:
            flat = flat.half()
        name = f"zero.grad.{unit.index}"
        for waiting in self.in_flight[:len(self.in_flight) + 1 - IN_FLIGHT]:  # (a unit's whole gradients are
            self._collect(waiting)                                              # held until its collective ends)
        unit.handle = self.hvd.reducescatter_async(flat, name=name, op=self.hvd.Average)
        self.in_flight.append(unit)
        for p in unit.params:
            p.grad = None
        unit.free()

    def _allreduce_all(self) -> None:
        """Stage 1, at the end of a step's last pass: every unit's gradients averaged in one fused collective round
        (as dist.gradient_groups=1 does without ZeRO: one round rather than one per unit)."""
        flats = [unit.flat_grad() for unit in self.units]
        if self.fp16_compression:
            flats = [flat.half() for flat in flats]
        self.allreduced = (self.hvd.grouped_allreduce_async_(flats, name="zero.grads", op=self.hvd.Average), flats)

    def _collect_allreduced(self) -> None:
        if self.allreduced is None:
            return
        handle, flats = self.allreduced
        self.hvd.synchronize(handle)
        self.allreduced = None
        for unit, flat in zip(self.units, flats, strict=True):
            assert unit.grad_buffer is not None, "stage 1 keeps its gradients flat"
            if flat is not unit.grad_buffer:  # (fp16 compression averaged a copy)
                unit.grad_buffer.copy_(flat)
            unit.shard.grad = unit.grad_buffer[unit.shard_range()]

    def _collect(self, unit: Unit) -> None:
        if unit.handle is None:
            return
        reduced = self.hvd.synchronize(unit.handle).to(unit.full.dtype)
        unit.handle = None
        self.in_flight.remove(unit)
        if unit.shard.grad is None:
            unit.shard.grad = reduced
        else:
            unit.shard.grad.add_(reduced)

    def _end_of_pass(self) -> None:
        if self.stage == 1:
            if self._last_pass():
                self._allreduce_all()
        else:
            for unit in self.units:
                self._launch(unit)  # (a unit with a parameter this pass did not reach)
            for unit in self.units:
                self._collect(unit)
        self.passes += 1
        for unit in self.units:
            unit.ready, unit.launched = 0, False
        self._callback_queued = False

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = passes

    def zero_grad(self) -> None:
        for unit in self.units:
            unit.shard.grad = None
            if unit.grad_buffer is not None:
                unit.grad_buffer.zero_()
                continue
            for p in unit.params:
                p.grad = None
        self.passes = 0
        self.synchronized = False

    def synchronize(self) -> None:
        """Wait for the gradients' collectives: every shard then holds its averaged gradient."""
        if self.synchronized:
            return
        self._collect_allreduced()
        for unit in self.units:
            self._collect(unit)
            if unit.shard.grad is None:
                unit.shard.grad = torch.zeros_like(unit.shard)
        self.synchronized = True
        if self.agree_on_overflow and self.any_nonfinite():
            self.poison()

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        yield  # (step() synchronizes only once)

    @property
    def param_groups(self) -> list[dict]:
        """The shards' (what a loss scaler unscales)."""
        return self.inner.param_groups

    def shards(self) -> list[nn.Parameter]:
        return [u.shard for u in self.units]

    def grad_norm(self) -> torch.Tensor:
        """Collective: the norm of the whole averaged gradient (the shards' squares summed over the workers)."""
        square = sum(float(u.shard.grad.double().square().sum()) for u in self.units if u.shard.grad is not None)
        return torch.tensor(math.sqrt(dist.allreduce_sum([square])[0]), dtype=torch.float32)

    def any_nonfinite(self) -> bool:
        """Collective: whether a gradient is NaN or infinite on any worker."""
        local = any(not bool(torch.isfinite(u.shard.grad).all()) for u in self.units if u.shard.grad is not None)
        return bool(dist.allreduce_sum([float(local)])[0] > 0)

    def poison(self) -> None:
        """Make this worker's shards non-finite, so that a loss scaler skips the step here as on the worker whose
        gradients overflowed."""
        for unit in self.units:
            assert unit.shard.grad is not None, "poisoned after synchronize"
            unit.shard.grad.fill_(math.inf)

    def step(self) -> None:
        self.synchronize()
        self.inner.step()
        self.gather_whole_units()

    def gather_whole_units(self) -> None:
        """The units kept whole take every worker's updated shard, in one collective round."""
        whole = [u for u in self.units if u.whole]
        if self.hvd.size() == 1 or not whole:
            return
        gathered = self.hvd.grouped_allgather([u.shard.detach() for u in whole], name="zero.gather_whole")
        for unit, flat in zip(whole, gathered, strict=True):
            unit.repoint(flat)

    def gather_all(self) -> None:
        """Collective: every unit's parameters whole until release_all (a digest, the export)."""
        for unit in self.units:
            unit.gather(self.hvd)
            unit.pinned = True

    def release_all(self) -> None:
        for unit in self.units:
            unit.pinned = False
            unit.free()

    @contextmanager
    def gathered(self, unit: Unit) -> Iterator[None]:
        """Collective: one unit's parameters whole for a while (the others stay as they are)."""
        unit.gather(self.hvd)
        try:
            yield
        finally:
            unit.free()

    def release_training_state(self) -> None:
        """Free the optimizer state and the gradients, once training is over (before the model is gathered whole
        for its export)."""
        self.inner.state.clear()
        self.zero_grad()
        for unit in self.units:
            unit.grad_buffer = None
            for p in unit.params:
                p.grad = None

    def sharded_names(self) -> set[str]:
        """The parameters the units hold (the others, and the buffers, are whole on every worker)."""
        return {name for unit in self.units for name in unit.names}

    def state_bytes(self) -> dict[str, int]:
        """Bytes this worker holds between steps: parameters, gradients and optimizer state."""
        shards = sum(u.shard_numel for u in self.units) * FLOAT_BYTES
        whole = sum(u.padded for u in self.units if u.whole) * FLOAT_BYTES
        gathered = sum(u.shard_numel for u in self.units if not u.whole) * FLOAT_BYTES
        full = sum(u.padded for u in self.units) * FLOAT_BYTES
        return {"parameters": whole + gathered, "gradients": full if self.stage == 1 else shards,
                "optimizer_state": tensor_bytes(self.inner)}
