"""What the trainers' ONNX tests share: `ddl export` of a trained run, read back with onnxruntime alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pandas as pd

from tests.engine_runs import ddl


def exported(run: Path, output: Path) -> tuple[onnxruntime.InferenceSession, dict]:
    """`ddl export RUN --format onnx -o OUTPUT`, checked by onnx.checker: a session on it and its metadata."""
    result = ddl("export", str(run), "--format", "onnx", "-o", str(output))
    assert result.returncode == 0, result.stderr
    assert f"wrote {output}" in result.stderr and "largest absolute difference" in result.stderr
    onnx.checker.check_model(str(output), full_check=True)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    metadata = {key: json.loads(value) for key, value in session.get_modelmeta().custom_metadata_map.items()}
    return session, metadata


def largest_difference(got: np.ndarray, expected: np.ndarray) -> float:
    """The largest absolute difference of onnxruntime's outputs from the framework's (printed: `pytest -s`)."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    difference = float(np.max(np.abs(got.astype(np.float64) - expected)))
    print(f"onnxruntime against the framework: largest absolute difference {difference:.2g}")
    return difference


def table_inputs(csv: Path, metadata: dict) -> dict[str, np.ndarray]:
    """A tabular graph's inputs from a CSV file, as docs/export.md reads one: every cell as text, numbers parsed
    (blank cells NaN), categories as written."""
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    numeric = frame[metadata["numeric_columns"]].apply(pd.to_numeric, errors="coerce").to_numpy("float64")
    return {"numeric": numeric, "categories": frame[metadata["categorical_columns"]].to_numpy(object)}
