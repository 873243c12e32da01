"""The data-parallel training loop for PyTorch trainers.

A trainer hands the engine a `TorchTask` (data, model, loss, per-example predictions, metrics, export); the
engine owns everything else: Horovod, the optimizer and its wrapping, broadcast, sharding, accumulation, LR
schedule, clipping, precision, evaluation across ranks, checkpoints and resume, and the run directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ddl_apps.core import checkpoint as ckpt
from ddl_apps.core import dist, rundir, sharding
from ddl_apps.core.metrics import RunLog, SilentLog
from ddl_apps.errors import CheckpointError
from ddl_apps.recipe import OptimConfig, Recipe

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    def __len__(self) -> int: ...
    def take(self, indices: np.ndarray) -> Batch: ...


class TensorSource:
    """Equal-length tensors (columns) served by index: the fast path for tabular and fixed-size data."""

    def __init__(self, **columns: torch.Tensor):
        lengths = {len(c) for c in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns differ in length: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def take(self, indices: np.ndarray) -> Batch:
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return {k: v[index] for k, v in self.columns.items()}


class TorchTask(Protocol):
    """What a PyTorch trainer supplies. `predict` returns per-example arrays; `metrics` sees the whole split."""

    train: BatchSource
    valid: BatchSource
    test: BatchSource | None

    def build_model(self) -> torch.nn.Module: ...
    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor: ...
    def predict(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]: ...
    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]: ...
    def export(self, model: torch.nn.Module, model_dir: Path) -> None: ...
    def report(self) -> dict[str, dict[str, float]]: ...


@dataclass
class Progress:
    """Where training stands; with the model, optimizer and schedule, all that resume (or elastic) needs."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0


def scaled_lr(optim: OptimConfig, size: int, scale: bool) -> float:
    return optim.lr * (size * optim.accumulation if scale else 1)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to 1, then constant, linear or cosine decay to 0 at `total` steps."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    decay = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}
    return warm * decay[schedule]


def make_optimizer(optim: OptimConfig, params, lr: float) -> torch.optim.Optimizer:
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay)


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.state_dict().values()])


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights (no pickle), with a clear error when the file does not fit the model."""
    try:
        model.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot load weights from {path}: {e}") from None


class TorchEngine:
    def __init__(self, recipe: Recipe, task: TorchTask, topology: dist.Topology, run_dir: Path):
        import horovod.torch as hvd

        self.recipe, self.task, self.topo, self.run_dir = recipe, task, topology, run_dir
        self.device = torch.device(f"cuda:{topology.local_rank}" if torch.cuda.is_available() else "cpu")
        self.log = RunLog(run_dir, recipe.run.progress) if topology.is_root else SilentLog()
        optim = recipe.optim
        self.model = task.build_model().to(self.device)
        self.base_lr = scaled_lr(optim, topology.size, recipe.dist.scale_lr)
        self.steps_per_epoch = sharding.steps_per_epoch(len(task.train), optim.batch_size, topology.size,
                                                        optim.accumulation)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set ({len(task.train)} examples) is smaller than one global step "
                f"(batch_size {optim.batch_size} x {topology.size} workers x accumulation {optim.accumulation}); "
                "lower optim.batch_size or use more data"
            )
        self.total_steps = self.steps_per_epoch * optim.epochs
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        compression = hvd.Compression.fp16 if recipe.dist.compression == "fp16" else hvd.Compression.none
        self.optimizer = hvd.DistributedOptimizer(
            make_optimizer(optim, self.model.parameters(), self.base_lr),
            named_parameters=self.model.named_parameters(),
            compression=compression,
            backward_passes_per_step=optim.accumulation,
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, optim.warmup_steps, self.total_steps, optim.schedule)
        )
        self.progress = Progress()
        precision = recipe.run.precision
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    # ---- training -------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

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
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
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

    def fit(self) -> dict[str, dict[str, float]]:
        cfg, optim, topo = self.recipe.run, self.recipe.optim, self.topo
        self.log.start(self.total_steps, self.progress.step)
        global_batch = optim.batch_size * optim.accumulation * topo.size
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        stop = False
        while self.progress.epoch < optim.epochs and not stop:
            order = sharding.epoch_order(len(self.task.train), cfg.seed, self.progress.epoch)
            while self.progress.step_in_epoch < self.steps_per_epoch:
                micro = sharding.rank_step_batches(order, self.progress.step_in_epoch, optim.batch_size,
                                                   topo.rank, topo.size, optim.accumulation)
                window_loss += self.train_step(micro)
                window_steps += 1
                self.progress.step_in_epoch += 1
                self.progress.step += 1
                self.log.advance()
                if self.progress.step % cfg.log_every == 0:
                    loss_sum, steps = dist.allreduce_sum([window_loss, window_steps])
                    elapsed = time.perf_counter() - window_start
                    self.log.step(self.progress.step, {
                        "loss": loss_sum / steps, "lr": self.schedule.get_last_lr()[0],
                        "samples_per_s": window_steps * global_batch / elapsed,
                    })
                    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                if cfg.checkpoint_every and self.progress.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if cfg.max_steps and self.progress.step >= cfg.max_steps:
                    stop = True
                    break
            if not stop:
                self.progress.epoch += 1
                self.progress.step_in_epoch = 0
                if cfg.eval_every_epoch:
                    self.log.record("valid", self.progress.step, self.evaluate(self.task.valid)[0])
            self.save_checkpoint()
        return self.finish(complete=not stop)

    # ---- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, source: BatchSource) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        outputs = predict_split(self.model, self.task, source, self.topo, self.recipe.optim.batch_size * 4,
                                self.device, self._autocast)
        return self.task.metrics(outputs), outputs

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
        }

    def save_checkpoint(self) -> None:
        """Collective: gathers every rank's RNG state; rank 0 writes."""
        rng = dist.allgather_array(torch.get_rng_state().numpy()[None])
        if not self.topo.is_root:
            return

        def write(folder: Path) -> None:
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                      str(folder / "model.safetensors"))
            ckpt.save_state(folder, "training", {**self._state(), "rng": rng})
            (folder / "progress.json").write_text(json.dumps({**asdict(self.progress), "size": self.topo.size}))

        ckpt.write_checkpoint(self.run_dir / rundir.CHECKPOINTS, self.progress.step, write,
                              self.recipe.run.keep_checkpoints)

    def restore(self) -> None:
        """Load the newest good checkpoint on rank 0 and hand it to every rank."""
        payload = dist.on_root(self._read_checkpoint)
        self.model.load_state_dict(payload["model"])
        training = payload["training"]
        self.optimizer.load_state_dict(training["optimizer"])
        self.schedule.load_state_dict(training["schedule"])
        if self.scaler and training["scaler"]:
            self.scaler.load_state_dict(training["scaler"])
        saved = payload["progress"]
        if saved.pop("size") == self.topo.size:
            torch.set_rng_state(torch.from_numpy(np.asarray(training["rng"][self.topo.rank])))
        self.progress = Progress(**saved)
        self.log.message(f"resumed from {payload['path']} at step {self.progress.step}")

    def _read_checkpoint(self) -> dict:
        found = ckpt.latest_valid(self.run_dir / rundir.CHECKPOINTS, self.log.message)
        if found is None:
            raise CheckpointError(
                f"--resume found no usable checkpoint in {self.run_dir / rundir.CHECKPOINTS}; "
                "start a new run without --resume"
            )
        return {
            "path": str(found),
            "model": load_file(str(found / "model.safetensors")),
            "training": ckpt.load_state(found, "training"),
            "progress": json.loads((found / "progress.json").read_text()),
        }

    # ---- the end of a run -----------------------------------------------------------------------------
    def weights_digest_by_rank(self) -> list[str]:
        """SHA-256 of every rank's weights: all equal unless data parallelism broke."""
        digest = hashlib.sha256(flat_parameters(self.model).numpy().tobytes()).digest()
        gathered = dist.allgather_array(np.frombuffer(digest, dtype=np.uint8).copy())
        return [bytes(row).hex() for row in gathered.reshape(self.topo.size, -1)]

    def finish(self, complete: bool) -> dict[str, dict[str, float]]:
        results: dict[str, dict[str, float]] = {}
        digests = self.weights_digest_by_rank()
        if len(set(digests)) > 1:
            self.log.message(f"[bold red]warning:[/] weights differ across ranks: {digests}")
        if complete:
            split = "test" if self.task.test is not None else "valid"
            metrics, outputs = self.evaluate(self.task.test if self.task.test is not None else self.task.valid)
            results[f"model ({split})"] = metrics
            self.log.record(split, self.progress.step, metrics)
            if self.topo.is_root:
                np.savez(self.run_dir / f"{split}_outputs.npz", **outputs)
                self.task.export(self.model, self.run_dir / rundir.MODEL_DIR)
                results.update(self.task.report())
                summary = {"results": results, "steps": self.progress.step, "workers": self.topo.size,
                           "weights_sha256_by_rank": digests}
                (self.run_dir / rundir.SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        self.log.close(results)
        return results


@torch.no_grad()
def predict_split(model, task: TorchTask, source: BatchSource, topo: dist.Topology, batch_size: int,
                  device: torch.device, autocast) -> dict[str, np.ndarray]:
    """Per-example predictions for a whole split, each example on exactly one rank, gathered in order."""
    model.eval()
    mine = sharding.eval_shard(len(source), topo.rank, topo.size)
    chunks = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)] or [mine]
    parts: dict[str, list[np.ndarray]] = {}
    for chunk in chunks:
        batch = {k: v.to(device) for k, v in source.take(chunk).items()}
        with autocast():
            out = task.predict(model, batch)
        for key, value in out.items():
            parts.setdefault(key, []).append((value.float() if value.is_floating_point() else value).cpu().numpy())
    local = {k: np.concatenate(v) for k, v in parts.items()}
    ordered = np.argsort(dist.allgather_array(mine), kind="stable")
    return {k: dist.allgather_array(v)[ordered] for k, v in local.items()}


def evaluate_run(recipe: Recipe, run_dir: Path) -> dict[str, float]:
    """Metrics of a run's exported model on its test split (validation split if it has none)."""
    from contextlib import nullcontext

    from ddl_apps.trainers import load_trainer

    topology = dist.init_torch()
    task = load_trainer(recipe.trainer).build_task(recipe, topology)
    model = task.build_model()
    load_weights(model, run_dir / rundir.MODEL_DIR / rundir.MODEL_WEIGHTS)
    source = task.test if task.test is not None else task.valid
    outputs = predict_split(model, task, source, topology, recipe.optim.batch_size * 4, torch.device("cpu"),
                            nullcontext)
    return task.metrics(outputs)


def train(recipe: Recipe, resume: bool = False) -> Path:
    """Run a PyTorch recipe on this process's Horovod worker; returns the run directory."""
    from ddl_apps.trainers import load_trainer

    topology = dist.init_torch()
    dist.seed_everything(recipe.run.seed + topology.rank)
    run_dir = dist.on_root(rundir.choose_run_dir, recipe, resume)
    task = load_trainer(recipe.trainer).build_task(recipe, topology)  # bad data fails here, before any file
    dist.on_root(rundir.prepare_run_dir, run_dir, recipe, resume)
    engine = TorchEngine(recipe, task, topology, run_dir)
    if resume:
        engine.restore()
    engine.fit()
    return run_dir
