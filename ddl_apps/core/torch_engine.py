"""The data-parallel engine for PyTorch trainers: Horovod's DistributedOptimizer (or, with dist.zero, the
ZeroOptimizer of core/parallel/zero.py) with accumulation, compression, clipping and mixed precision; weights and
optimizer state checkpointed as safetensors (+ JSON), or as each worker's shards."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ddl_apps.core import checkpoint as ckpt
from ddl_apps.core import dist, sharding
from ddl_apps.core.engine import Engine
from ddl_apps.core.feed import examples_in
from ddl_apps.core.launch import ZERO_UNDER_ELASTIC
from ddl_apps.core.parallel import embedding as parallel
from ddl_apps.core.parallel import zero_checkpoint as zero_ckpt
from ddl_apps.core.parallel.zero import TABLES_REFUSAL, ZeroOptimizer, tensor_bytes
from ddl_apps.core.sources import ColumnSource
from ddl_apps.errors import CheckpointError, RecipeError
from ddl_apps.recipe import OptimConfig, Recipe

Batch = dict[str, torch.Tensor]


def make_optimizer(optim: OptimConfig, params, lr: float, foreach: bool | None = None) -> torch.optim.Optimizer:
    """`foreach`: None lets torch choose; False steps one tensor at a time (the temporaries are one tensor's, not
    the whole model's)."""
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                               foreach=foreach)
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=optim.weight_decay, foreach=foreach)
    return torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay, foreach=foreach)


WEIGHTS = "model.safetensors"  # in an exported model's folder and in every checkpoint
UNSHARDED = "unsharded.safetensors"  # in a ZeRO checkpoint: what no unit shards (buffers, frozen parameters)


def _host_tensor(obj: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(obj)) if isinstance(obj, np.ndarray) else obj.detach().cpu().contiguous()


TORCH_FILES = ckpt.TensorFiles(lambda obj: isinstance(obj, torch.Tensor), _host_tensor, save_file, load_file)


def save_weights(model: torch.nn.Module | dict[str, torch.Tensor], folder: Path, name: str = WEIGHTS) -> None:
    """The weights (of a model, or a state dict), as safetensors, in `folder` (an exported model's, or a
    checkpoint's)."""
    state = model if isinstance(model, dict) else model.state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / name))


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load what save_weights wrote (no pickle), with a clear error when it does not fit the model; sharded
    tables take their own rows."""
    try:
        parallel.load_replicated_state(model, load_file(str(folder / WEIGHTS)))
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot load weights from {folder / WEIGHTS}: {e}") from None


def pack_rng_state(cpu: torch.Tensor, cuda: torch.Tensor | None) -> np.ndarray:
    """One byte array of the CPU generator's state and, on a GPU, the device generator's (dropout, SpecAugment's
    masks and the like draw on the device there)."""
    return np.concatenate([cpu.numpy(), cuda.cpu().numpy() if cuda is not None else np.zeros(0, np.uint8)])


def unpack_rng_state(state: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What pack_rng_state packed: (CPU state, device state or None)."""
    cpu_bytes = torch.get_rng_state().numel()
    packed = torch.from_numpy(np.ascontiguousarray(state, dtype=np.uint8))
    return packed[:cpu_bytes].clone(), packed[cpu_bytes:].clone() if len(packed) > cpu_bytes else None


class TorchEngine(Engine):
    init = staticmethod(dist.init_torch)
    elastic = "horovod.torch.elastic"
    tensor_files = TORCH_FILES
    optimizer: Any  # Horovod's DistributedOptimizer, or with dist.zero a ZeroOptimizer: the same calls

    def __init__(self, recipe: Recipe, task, topology: dist.Topology, run_dir: Path, training: bool = True):
        super().__init__(recipe, task, topology, run_dir, training)
        self.device = torch.device(f"cuda:{topology.local_rank}" if torch.cuda.is_available() else "cpu")
        self.model = task.build_model().to(self.device)
        precision = recipe.run.precision
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.zero: ZeroOptimizer | None = None
        self.writes_shards = bool(training and recipe.dist.zero)
        if training:
            self._build_optimizer(recipe)

    def _build_optimizer(self, recipe: Recipe) -> None:
        import horovod.torch as hvd

        optim = recipe.optim
        shards = parallel.sharded_keys(self.model)  # each rank's own rows: neither broadcast nor allreduced
        if dist.is_elastic():
            if shards:
                raise RecipeError("--elastic cannot re-shard embedding tables across a changing number of workers; "
                                  "train this recipe without --elastic, or with model.model_parallel=false")
        else:  # (an elastic run broadcasts its whole state when training starts)
            hvd.broadcast_parameters({k: v for k, v in self.model.state_dict().items() if k not in shards},
                                     root_rank=0)
        if recipe.dist.zero:
            if shards:
                raise RecipeError(TABLES_REFUSAL)
            self.zero = ZeroOptimizer(hvd, self.model, recipe.dist.zero,
                                      lambda params: make_optimizer(optim, params, self.base_lr, foreach=False),
                                      recipe.dist.zero_bucket_mb, fp16_compression=recipe.dist.compression == "fp16",
                                      agree_on_overflow=recipe.run.precision == "fp16")
            self.optimizer = self.zero
            stepped = self.zero.inner  # (what the LR schedule sets)
        else:
            compression = hvd.Compression.fp16 if recipe.dist.compression == "fp16" else hvd.Compression.none
            self.optimizer = stepped = hvd.DistributedOptimizer(
                make_optimizer(optim, self.model.parameters(), self.base_lr),
                named_parameters=self.model.named_parameters(),
                compression=compression,
                backward_passes_per_step=optim.accumulation,
                local_parameters=parallel.sharded_parameters(self.model),
                groups=recipe.dist.gradient_groups or None,
            )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(stepped, self.lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type) if recipe.run.precision == "fp16" else None

    @staticmethod
    def check_recipe(recipe: Recipe, task, size: int) -> None:
        if recipe.dist.zero and dist.is_elastic():
            raise RecipeError(ZERO_UNDER_ELASTIC)
        if recipe.dist.zero and recipe.run.early_stopping:
            raise RecipeError("run.early_stopping keeps a copy of the whole model on every worker, which dist.zero "
                              "shards: train with dist.zero=0, or without run.early_stopping (each epoch's "
                              "checkpoint keeps its state; run.keep_checkpoints sets how many)")

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ---- training -------------------------------------------------------------------------------------
    def run_steps(self, first: int, count: int) -> list[float]:
        steps = self.feed.steps(self.state.epoch, first, count, self.topo)
        positions = sharding.micro_batch_positions(first, count, self.feed.micro_batches(self.topo.size),
                                                   self.topo.rank, self.topo.size)
        return [self.train_step(micro_batches, self.state.step + 1 + i, positions[i])
                for i, micro_batches in enumerate(steps)]

    def train_step(self, micro_batches: list[Batch], step: int, positions: np.ndarray) -> float:
        """Optimizer step `step` over this rank's micro-batches; returns the rank's mean loss (NaN if skipped).

        Each micro-batch's loss is weighted by its share of the global batch, so the averaged gradient is the
        global batch's mean gradient even when ranks' shares differ (an elastic run with fewer workers). Its random
        draws (dropout, augmentation in the loss) come from torch's generator seeded by its position in the epoch,
        so they do not depend on the number of workers, and a resumed run draws them again."""
        self.model.train()
        if len(micro_batches) != self.optimizer.backward_passes_per_step:
            self.optimizer.set_backward_passes_per_step(len(micro_batches))
        self.optimizer.zero_grad()
        total = 0.0
        seed = sharding.epoch_seed(self.recipe.run.seed, self.state.epoch, 1)
        for batch, position in zip(micro_batches, positions, strict=False):  # (a share may have fewer)
            torch.manual_seed((seed + int(position)) % 2**63)
            with self._autocast():
                loss = self.task.loss(self.model, self._to_device(batch))
            scaled = loss * (examples_in(batch) * self.topo.size / self.global_batch)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += float(loss.detach()) * examples_in(batch)
        optim = self.recipe.optim
        skip_nonfinite = optim.nonfinite == "skip" and not self.scaler  # (the fp16 scaler skips such steps itself)
        if optim.clip_grad_norm or self.scaler or skip_nonfinite:
            self.optimizer.synchronize()  # gradients are allreduced here, then unscaled and clipped locally
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            if optim.clip_grad_norm or skip_nonfinite:
                norm = self.zero.grad_norm() if self.zero else parallel.global_grad_norm(self.model)
                if skip_nonfinite and not torch.isfinite(norm):  # the same on every rank: gradients are averaged
                    self.skipped_steps.append(step)
                    self.schedule.step()
                    return float("nan")
                if optim.clip_grad_norm:
                    stepped = self.zero.shards() if self.zero else self.model.parameters()
                    torch.nn.utils.clip_grads_with_norm_(stepped, optim.clip_grad_norm, norm)
            with self.optimizer.skip_synchronize():
                self._optimizer_step()
        else:
            self._optimizer_step()
        self.schedule.step()
        return total / sum(examples_in(batch) for batch in micro_batches)

    def _optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def current_lr(self) -> float:
        return float(self.schedule.get_last_lr()[0])

    def statistics(self) -> list[torch.Tensor]:
        return [b for b in self.model.buffers() if b.is_floating_point()]

    @torch.no_grad()
    def assign_statistics(self, values: list[torch.Tensor]) -> None:
        for buffer, value in zip(self.statistics(), values, strict=True):
            buffer.copy_(value)

    @torch.no_grad()
    def predict_batch(self, batch: Batch) -> dict[str, np.ndarray]:
        self.model.eval()
        with self._autocast():
            out = self.task.predict(self.model, self._to_device(batch))
        return {k: (v.float() if v.is_floating_point() else v).cpu().numpy() for k, v in out.items()}

    def weights_arrays(self) -> Iterator[np.ndarray]:
        if not self.zero:
            for value in parallel.replicated_state(self.model).values():
                yield value.cpu().numpy()
            return
        for unit in self.zero.units:  # one unit whole at a time
            with self.zero.gathered(unit):
                for p in unit.params:  # (copies: numpy's view would pin the storage, which stage 3 frees)
                    yield p.detach().clone().numpy()
        for value in self._unsharded_state().values():
            yield value.cpu().numpy()

    @torch.no_grad()
    def snapshot_weights(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().clone() for key, value in parallel.replicated_state(self.model).items()}

    def load_snapshot(self, weights: dict[str, torch.Tensor]) -> None:
        parallel.load_replicated_state(self.model, weights)

    def parameter_bytes(self) -> dict[str, int]:
        def size(params) -> int:
            return sum(p.numel() * p.element_size() for p in params)

        sharded = size(parallel.sharded_parameters(self.model))
        if self.zero:
            return {**self.zero.state_bytes(), "sharded": sharded}
        return {"parameters": size(self.model.parameters()),
                "gradients": size(p for p in self.model.parameters() if p.requires_grad),
                "optimizer_state": tensor_bytes(self.optimizer), "sharded": sharded}

    def exportable_model(self) -> torch.nn.Module:
        if self.zero:  # (training is over: its checkpoint is written and its memory counted)
            self.zero.release_training_state()
            self.zero.gather_all()  # (for the rest of the run: the final evaluation and the export)
        return parallel.replicated_model(self.model)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def rng_state(self) -> np.ndarray:
        return pack_rng_state(torch.get_rng_state(), torch.cuda.get_rng_state() if self.device.type == "cuda" else None)

    def set_rng_state(self, state: np.ndarray) -> None:
        cpu, cuda = unpack_rng_state(state)
        torch.set_rng_state(cpu)
        if cuda is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda)

    def write_shards(self, folder: Path) -> dict[str, str]:
        assert self.zero is not None
        return zero_ckpt.write_shard(self.zero, folder, self.topo.rank)

    def gather_state(self) -> dict | None:
        if self.zero:
            return None  # (each rank writes its own shards)
        return {"model": parallel.replicated_state(self.model),
                "optimizer": parallel.replicated_optimizer_state(self.optimizer, self.model)}

    def write_state(self, folder: Path, gathered: dict | None) -> None:
        if self.zero:
            (folder / zero_ckpt.LAYOUT).write_text(json.dumps(zero_ckpt.layout(self.zero)))
            save_weights(self._unsharded_state(), folder, UNSHARDED)
            optimizer = zero_ckpt.optimizer_summary(self.zero)
        else:
            assert gathered is not None
            save_weights(gathered["model"], folder)
            optimizer = gathered["optimizer"]
        ckpt.save_state(folder, "training", {
            "optimizer": optimizer,
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
        }, TORCH_FILES)

    def _unsharded_state(self) -> dict[str, torch.Tensor]:
        """The model's state that ZeRO does not shard: buffers, frozen and shared parameters."""
        assert self.zero is not None
        sharded = self.zero.sharded_names()
        return {key: value for key, value in self.model.state_dict().items() if key not in sharded}

    def _parameter_names(self) -> list[str]:
        """In the order the optimizer of a dist.zero=0 run holds them."""
        return [name for name, _ in self.model.named_parameters()]

    def _read_checkpoint(self, checkpoint: Path) -> dict:
        """The whole state, from a checkpoint of the whole state or of ZeRO shards."""
        training = ckpt.load_state(checkpoint, "training", TORCH_FILES)
        if not zero_ckpt.is_sharded(checkpoint):
            return {"model": load_file(str(checkpoint / WEIGHTS)), "training": training}
        params, optimizer = zero_ckpt.whole_state(zero_ckpt.ShardedSource(checkpoint), training["optimizer"],
                                                  self._parameter_names())
        return {"model": {**load_file(str(checkpoint / UNSHARDED)), **params},
                "training": {**training, "optimizer": optimizer}}

    def restore_state(self, checkpoint: Path | None) -> None:
        if self.zero:  # every rank reads its own slices
            dist.on_every_rank(self._load_shards, dist.broadcast_object(checkpoint))
            return
        # rank 0 reads; every rank gets the same state and keeps its own rows
        self._apply_checkpoint(dist.on_root(self._read_checkpoint, checkpoint))

    def _load_shards(self, checkpoint: Path) -> None:
        assert self.zero is not None
        training = ckpt.load_state(checkpoint, "training", TORCH_FILES)
        source: zero_ckpt.ShardedSource | zero_ckpt.ReplicatedSource
        if zero_ckpt.is_sharded(checkpoint):
            source, unsharded = zero_ckpt.ShardedSource(checkpoint), load_file(str(checkpoint / UNSHARDED))
        else:
            whole = load_file(str(checkpoint / WEIGHTS))
            source = zero_ckpt.ReplicatedSource(whole, training["optimizer"], self._parameter_names())
            unsharded = {key: value for key, value in whole.items() if key not in self.zero.sharded_names()}
        self.model.load_state_dict(unsharded, strict=False)
        zero_ckpt.load_shards(self.zero, source, training["optimizer"])
        self._load_schedule(training)

    def load_checkpoint(self, checkpoint: Path) -> None:
        self._apply_checkpoint(self._read_checkpoint(checkpoint))

    def _apply_checkpoint(self, state: dict) -> None:
        parallel.load_replicated_state(self.model, state["model"])
        training = state["training"]
        parallel.load_replicated_optimizer_state(self.optimizer, self.model, training["optimizer"])
        self._load_schedule(training)

    def _load_schedule(self, training: dict) -> None:
        """The LR schedule's state, and the fp16 loss scaler's, from a checkpoint's training state."""
        self.schedule.load_state_dict(training["schedule"])
        if self.scaler and training["scaler"]:
            self.scaler.load_state_dict(training["scaler"])

    def load_exported(self, model_dir: Path) -> None:
        load_weights(self.model, model_dir)

    # ---- elastic training -----------------------------------------------------------------------------
    def modules_state_dict(self) -> dict:
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "schedule": self.schedule.state_dict(),
                              "scaler": self.scaler.state_dict() if self.scaler else {}})

    def load_modules_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # (Horovod's also drops pending allreduces)
        self._load_schedule(state)

    def resized(self, topology: dist.Topology) -> None:
        super().resized(topology)
        dist.share_torch_cores(topology)


__all__ = ["ColumnSource", "TorchEngine", "load_weights", "save_weights"]
