"""ONNX export shared by the trainers (`ddl export RUN_DIR --format onnx`): a PyTorch module to an ONNX graph with
dynamic axes, metadata a user of onnxruntime alone needs (label names, vocabularies, a tokenizer), and a check of
the written graph against the framework before the file appears.

The file is written beside the target under a hidden name and renamed at the end, so a failure leaves nothing.
Frameworks are imported where they are used: a Keras trainer's export never imports torch, nor a PyTorch one's
TensorFlow."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any

import numpy as np

from ddl_apps.errors import CheckpointError

OPSET = 18
TOLERANCE = 1e-4  # the largest absolute difference from the framework's outputs a written graph may show

Arrays = dict[str, np.ndarray]


@contextmanager
def written_atomically(output: Path) -> Iterator[Path]:
    """A hidden path beside `output`, renamed to it when the block ends without an error (removed otherwise)."""
    partial = output.with_name(f".{output.name}.partial")
    try:
        yield partial
        partial.rename(output)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def quiet(logger: str) -> Iterator[None]:
    """A converter's warnings and notes (deprecations, tracing, which ops it skips, the graph of a capture it retries
    another way) kept from the user: inside the block, no warnings, nothing on stderr and only errors from `logger`.
    A conversion that fails still raises."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def export_torch(module: Any, inputs: dict[str, Any], outputs: list[str], dynamic: dict[str, dict[int, str]],
                 path: Path, smallest: dict[str, int] | None = None) -> None:
    """`module(*inputs.values())` as an ONNX graph with inputs and outputs so named; `dynamic` names the axes of the
    inputs that may take any size (an axis name shared by inputs is one size), from 1 or what `smallest` says; the
    example should hold at least 2 along each (torch.export takes a size of 1 for a constant). With torch.export
    (dynamo), torch's default exporter."""
    import torch

    smallest = smallest or {}
    sizes = {name: torch.export.Dim(name, min=smallest.get(name, 1))
             for axes in dynamic.values() for name in axes.values()}
    shapes = tuple({axis: sizes[name] for axis, name in dynamic.get(key, {}).items()} for key in inputs)
    with torch.no_grad(), quiet("torch.onnx"):
        torch.onnx.export(module.eval(), tuple(inputs.values()), str(path), input_names=list(inputs),
                          output_names=outputs, dynamic_shapes=shapes, opset_version=OPSET, dynamo=True,
                          external_data=False, verbose=False)


def torch_outputs(module: Any, inputs: Arrays) -> list[np.ndarray]:
    """What `module` returns for numpy inputs, as numpy arrays (one or several outputs)."""
    import torch

    with torch.no_grad():
        result = module.eval()(*(torch.from_numpy(v) for v in inputs.values()))
    return [t.numpy() for t in (result if isinstance(result, tuple) else (result,))]


def add_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Each value, as JSON, into the file's metadata_props: onnxruntime reads them back with
    `session.get_modelmeta().custom_metadata_map`."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {key: json.dumps(value) for key, value in metadata.items()})
    onnx.save(model, str(path))


def rename_io(path: Path, inputs: list[str], outputs: list[str]) -> None:
    """The graph's inputs and outputs, in order, given these names (a converter's own are often opaque)."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    renamed = {v.name: name for values, names in ((graph.input, inputs), (graph.output, outputs))
               for v, name in zip(values, names, strict=True)}
    for value in [*graph.input, *graph.output]:
        value.name = renamed[value.name]
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    onnx.save(model, str(path))


def largest_difference(path: Path, inputs: Arrays, expected: list[np.ndarray]) -> float:
    """The graph checked by onnx.checker and run by onnxruntime on `inputs`: the largest absolute difference of its
    outputs from `expected` (the framework's), or a CheckpointError when it exceeds TOLERANCE."""
    import onnx
    import onnxruntime

    onnx.checker.check_model(str(path), full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, inputs)
    difference = max(float(np.max(np.abs(g.astype(np.float64) - e), initial=0)) for g, e in zip(got, expected,
                                                                                                  strict=True))
    if not difference <= TOLERANCE:
        raise CheckpointError(f"the ONNX graph disagrees with the framework by up to {difference:.3g} (more than "
                              f"{TOLERANCE}) on an example batch; nothing was written. Please report this with the "
                              "run's config.yaml")
    return difference


def write_onnx(output: Path, convert: Callable[[Path], Arrays], expected: list[np.ndarray],
               metadata: dict[str, Any]) -> float:
    """`convert(path)` writes the graph and returns an example batch as the graph takes it, for which the
    framework gave `expected`; then the metadata, the check, and the file renamed to `output`. Returns the largest
    absolute difference."""
    with written_atomically(output) as partial:
        example = convert(partial)
        add_metadata(partial, metadata)
        return largest_difference(partial, example, expected)


def write_torch_onnx(output: Path, module: Any, example: Arrays, outputs: list[str],
                     dynamic: dict[str, dict[int, str]], metadata: dict[str, Any],
                     edit: Callable[[Path, Arrays], Arrays] | None = None, smallest: dict[str, int] | None = None
                     ) -> float:
    """A PyTorch module exported and checked on `example` against its own outputs; `edit(path, example)`, if given,
    changes the exported graph (e.g. puts a lookup in front of an input) and returns the example as the edited
    graph takes it. `smallest`: see export_torch."""
    import torch

    expected = torch_outputs(module, example)

    def convert(path: Path) -> Arrays:
        export_torch(module, {k: torch.from_numpy(v) for k, v in example.items()}, outputs, dynamic, path, smallest)
        return edit(path, example) if edit else example

    return write_onnx(output, convert, expected, metadata)
