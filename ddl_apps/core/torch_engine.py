"""The data-parallel engine for PyTorch trainers: Horovod's DistributedOptimizer with accumulation, compression,
clipping and mixed precision; weights and optimizer state checkpointed as safetensors (+ JSON)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ddl_apps.core import checkpoint as ckpt
from ddl_apps.core import dist, sharding
from ddl_apps.core.engine import ColumnSource, Engine, evaluate_exported, run_training
from ddl_apps.core.parallel import embedding as parallel
from ddl_apps.errors import CheckpointError
from ddl_apps.recipe import OptimConfig, Recipe

Batch = dict[str, torch.Tensor]


def make_optimizer(optim: OptimConfig, params, lr: float) -> torch.optim.Optimizer:
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay)


WEIGHTS = "model.safetensors"  # in an exported model's folder and in every checkpoint


def save_weights(model: torch.nn.Module | dict[str, torch.Tensor], folder: Path) -> None:
    """The weights (of a model, or a state dict), as safetensors, in `folder` (an exported model's, or a
    checkpoint's)."""
    state = model if isinstance(model, dict) else model.state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / WEIGHTS))


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load what save_weights wrote (no pickle), with a clear error when it does not fit the model; sharded
    tables take their own rows."""
    try:
        parallel.load_replicated_state(model, load_file(str(folder / WEIGHTS)))
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot load weights from {folder / WEIGHTS}: {e}") from None


class TorchEngine(Engine):
    init = staticmethod(dist.init_torch)

    def __init__(self, recipe: Recipe, task, topology: dist.Topology, run_dir: Path, training: bool = True):
        super().__init__(recipe, task, topology, run_dir, training)
        self.device = torch.device(f"cuda:{topology.local_rank}" if torch.cuda.is_available() else "cpu")
        self.model = task.build_model().to(self.device)
        precision = recipe.run.precision
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        if training:
            self._build_optimizer(recipe)

    def _build_optimizer(self, recipe: Recipe) -> None:
        import horovod.torch as hvd

        optim = recipe.optim
        shards = parallel.sharded_keys(self.model)  # each rank's own rows: neither broadcast nor allreduced
        hvd.broadcast_parameters({k: v for k, v in self.model.state_dict().items() if k not in shards}, root_rank=0)
        compression = hvd.Compression.fp16 if recipe.dist.compression == "fp16" else hvd.Compression.none
        self.optimizer = hvd.DistributedOptimizer(
            make_optimizer(optim, self.model.parameters(), self.base_lr),
            named_parameters=self.model.named_parameters(),
            compression=compression,
            backward_passes_per_step=optim.accumulation,
            local_parameters=parallel.sharded_parameters(self.model),
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type) if recipe.run.precision == "fp16" else None

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ---- training -------------------------------------------------------------------------------------
    def run_steps(self, order: np.ndarray, first: int, count: int) -> float:
        optim, topo = self.recipe.optim, self.topo
        return sum(self.train_step(sharding.rank_step_batches(order, step, optim.batch_size, topo.rank, topo.size,
                                                               optim.accumulation))
                   for step in range(first, first + count))

    def train_step(self, micro_batches: list[np.ndarray]) -> float:
        """One optimizer step over this rank's micro-batches; returns the rank's mean loss."""
        self.model.train()
        self.optimizer.zero_grad()
        total = 0.0
        for indices in micro_batches:
            with self._autocast():
                loss = self.task.loss(self.model, self._to_device(self.task.train.take(indices)))
            scaled = loss / len(micro_batches)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += float(loss.detach())
        clip = self.recipe.optim.clip_grad_norm
        if clip or self.scaler:
            self.optimizer.synchronize()  # gradients are allreduced here, then unscaled and clipped locally
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            if clip:
                torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), clip,
                                                     parallel.global_grad_norm(self.model))
            with self.optimizer.skip_synchronize():
                self._optimizer_step()
        else:
            self._optimizer_step()
        self.schedule.step()
        return total / len(micro_batches)

    def _optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def current_lr(self) -> float:
        return self.schedule.get_last_lr()[0]

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

    def weights_bytes(self) -> bytes:
        return b"".join(v.cpu().numpy().tobytes() for v in parallel.replicated_state(self.model).values())

    def parameter_bytes(self) -> dict[str, int]:
        def size(params) -> int:
            return sum(p.numel() * p.element_size() for p in params)

        return {"parameters": size(self.model.parameters()),
                "sharded": size(parallel.sharded_parameters(self.model))}

    def exportable_model(self) -> torch.nn.Module:
        return parallel.replicated_model(self.model)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def rng_state(self) -> np.ndarray:
        return torch.get_rng_state().numpy()

    def set_rng_state(self, state: np.ndarray) -> None:
        torch.set_rng_state(torch.from_numpy(state.astype(np.uint8)))

    def gather_state(self) -> dict:
        return {"model": parallel.replicated_state(self.model),
                "optimizer": parallel.replicated_optimizer_state(self.optimizer, self.model)}

    def write_state(self, folder: Path, gathered: dict) -> None:
        save_weights(gathered["model"], folder)
        ckpt.save_state(folder, "training", {
            "optimizer": gathered["optimizer"],
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
        })

    def restore_state(self, checkpoint: Path | None) -> None:
        def read() -> dict:
            return {"model": load_file(str(checkpoint / WEIGHTS)),
                    "training": ckpt.load_state(checkpoint, "training")}

        state = dist.on_root(read)  # rank 0 reads; every rank gets the same state and keeps its own rows
        parallel.load_replicated_state(self.model, state["model"])
        training = state["training"]
        parallel.load_replicated_optimizer_state(self.optimizer, self.model, training["optimizer"])
        self.schedule.load_state_dict(training["schedule"])
        if self.scaler and training["scaler"]:
            self.scaler.load_state_dict(training["scaler"])

    def load_exported(self, model_dir: Path) -> None:
        load_weights(self.model, model_dir)


def train(recipe: Recipe, resume: bool = False) -> Path:
    """Run a PyTorch recipe on this process's Horovod worker; returns the run directory."""
    return run_training(recipe, resume, TorchEngine)


def evaluate_run(recipe: Recipe, run_dir: Path) -> dict[str, float]:
    return evaluate_exported(recipe, run_dir, TorchEngine)


__all__ = ["ColumnSource", "TorchEngine", "load_weights", "save_weights", "train", "evaluate_run"]
