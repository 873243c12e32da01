"""ZeRO checkpoints: every worker writes its own shards of the parameters and the optimizer state; any number of
workers, at any ZeRO stage or none, reads them back (each reads only the slices it needs).

In a checkpoint folder: `zero.json`, the layout (each unit's parameter names and shapes, in the order they are
flattened, its padded length, and the worker count, which sets each shard's length), and per rank
`zero-rank-NNNNN.safetensors` with, for unit i, `i.param` and one `i.KEY` per elementwise optimizer state (Adam's
`exp_avg` and `exp_avg_sq`, SGD's `momentum_buffer`). What is not sharded (buffers, the optimizer's
hyperparameters and its step count, the LR schedule) is written by rank 0 like any checkpoint's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from ddl_apps.cache import file_sha256
from ddl_apps.core.checkpoint import fsync_file
from ddl_apps.core.parallel.zero import ZeroOptimizer
from ddl_apps.errors import CheckpointError

LAYOUT = "zero.json"


def shard_file(rank: int) -> str:
    return f"zero-rank-{rank:05d}.safetensors"


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / LAYOUT).is_file()


def _elementwise(value, numel: int) -> bool:
    return torch.is_tensor(value) and value.dim() == 1 and value.numel() == numel


def write_shard(zero: ZeroOptimizer, folder: Path, rank: int) -> dict[str, str]:
    """This rank's shards into `folder`, fsynced; returns {file name: SHA-256}."""
    tensors = {}
    for unit in zero.units:
        tensors[f"{unit.index}.param"] = unit.shard.detach()
        for key, value in zero.inner.state.get(unit.shard, {}).items():
            if _elementwise(value, unit.shard_numel):
                tensors[f"{unit.index}.{key}"] = value
    path = folder / shard_file(rank)
    stream_safetensors({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, path)
    fsync_file(path)
    return {path.name: file_sha256(path)}


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def stream_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory: safetensors' save_file first
    serialises every tensor into one bytes object, a second copy of a worker's whole shard (the memory ZeRO saves)."""
    header, offset = {}, 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # (the data starts 8-aligned)
    with path.open("wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for tensor in tensors.values():
            f.write(tensor.view(torch.uint8).numpy().data)


def layout(zero: ZeroOptimizer) -> dict:
    return {"stage": zero.stage, "size": zero.hvd.size(),
            "units": [{"names": unit.names, "shapes": [list(p.shape) for p in unit.params], "padded": unit.padded}
                      for unit in zero.units]}


def optimizer_summary(zero: ZeroOptimizer) -> dict:
    """What the optimizer's state holds beside its shards: the hyperparameters and the scalars (Adam's step)."""
    scalars = {key: float(value) for unit in zero.units for key, value in zero.inner.state.get(unit.shard, {}).items()
               if not _elementwise(value, unit.shard_numel)}
    return {"param_groups": [{k: v for k, v in group.items() if k != "params"} for group in zero.inner.param_groups],
            "scalars": scalars}


class ShardedSource:
    """Whole parameters and their optimizer state, read slice by slice from the shards of a ZeRO checkpoint."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint
        saved = json.loads((checkpoint / LAYOUT).read_text())
        size = saved["size"]
        self.where: dict[str, tuple[int, int, list[int], int]] = {}  # name: (unit, offset, shape, shard length)
        for index, unit in enumerate(saved["units"]):
            offset = 0
            for name, shape in zip(unit["names"], unit["shapes"], strict=True):
                self.where[name] = (index, offset, shape, unit["padded"] // size)
                offset += math.prod(shape)
        try:
            self.files = [safe_open(str(checkpoint / shard_file(rank)), "pt") for rank in range(size)]
        except OSError as e:
            raise CheckpointError(f"cannot read the ZeRO shards of checkpoint {checkpoint}: {e}. Every worker reads "
                                  "its own slices: run.dir must be on storage every host sees") from None
        self.keys = sorted({key.split(".", 1)[1] for key in self.files[0].keys()} - {"param"})

    def names(self) -> list[str]:
        return list(self.where)

    def param(self, name: str) -> torch.Tensor:
        return self._read(name, "param")

    def optimizer_value(self, name: str, key: str) -> torch.Tensor:
        return self._read(name, key)

    def _read(self, name: str, key: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"checkpoint {self.checkpoint} holds no parameter {name!r}: it was written by "
                                  "another model; resume with the recipe it was trained with")
        unit, offset, shape, shard = self.where[name]
        numel = math.prod(shape)
        out = torch.empty(numel)
        start = offset
        while start < offset + numel:
            rank = start // shard
            stop = min(offset + numel, (rank + 1) * shard)
            out[start - offset:stop - offset] = self.files[rank].get_slice(f"{unit}.{key}")[start - rank * shard:
                                                                                          stop - rank * shard]
            start = stop
        return out.view(shape)


class ReplicatedSource:
    """The same from a checkpoint of the whole state (dist.zero=0): the model's state dict and the optimizer's."""

    def __init__(self, model_state: dict[str, torch.Tensor], optimizer_state: dict, names: list[str]):
        self.model_state, self.names_ = model_state, names
        self.state = {names[i]: value for i, value in optimizer_state["state"].items()}
        self.keys = sorted({key for value in self.state.values() for key, v in value.items() if v.dim()})

    def names(self) -> list[str]:
        return self.names_

    def param(self, name: str) -> torch.Tensor:
        return self.model_state[name]

    def optimizer_value(self, name: str, key: str) -> torch.Tensor:
        return self.state[name][key]


def load_shards(zero: ZeroOptimizer, source: ShardedSource | ReplicatedSource, optimizer: dict) -> None:
    """This rank's shards of the parameters and optimizer state, from any checkpoint (`optimizer`: its
    optimizer_summary, or a whole optimizer state dict)."""
    scalars = optimizer.get("scalars") or {key: float(value) for param_state in optimizer["state"].values()
                                           for key, value in param_state.items() if not value.dim()}
    state: dict[int, dict] = {}
    for unit in zero.units:
        mine = unit.shard_range()
        for key in ("param", *source.keys):
            flat = torch.zeros(unit.shard_numel)
            for name, p, offset in unit.offsets():
                start, stop = max(offset, mine.start), min(offset + p.numel(), mine.stop)
                if start < stop:
                    whole = source.param(name) if key == "param" else source.optimizer_value(name, key)
                    flat[start - mine.start:stop - mine.start] = whole.flatten()[start - offset:stop - offset]
            if key == "param":
                with torch.no_grad():
                    unit.shard.copy_(flat)
            else:
                state.setdefault(unit.index, {})[key] = flat
        state.setdefault(unit.index, {}).update({key: torch.tensor(value) for key, value in scalars.items()})
    groups = [{**group, "params": list(range(len(zero.units)))} for group in optimizer["param_groups"]]
    zero.inner.load_state_dict({"state": state, "param_groups": groups})
    zero.gather_whole_units()


def whole_state(source: ShardedSource, optimizer: dict, names: list[str]) -> tuple[dict, dict]:
    """A ZeRO checkpoint as the whole state a dist.zero=0 run holds: the parameters by name and the optimizer's
    state dict, its parameters indexed in `names`' order."""
    params = {name: source.param(name) for name in names}
    state = {i: {**{key: source.optimizer_value(name, key) for key in source.keys},
                 **{key: torch.tensor(value) for key, value in optimizer["scalars"].items()}}  # (one each: Adam
             for i, name in enumerate(names)}                                              # steps it in place)
    groups = [{**group, "params": list(range(len(names)))} for group in optimizer["param_groups"]]
    return params, {"state": state, "param_groups": groups}
