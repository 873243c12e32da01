"""Issue 38: `ddl export` on bad input: one clear error, exit code 2, nothing written. (Each trainer's tests export
its own trained run: tests/trainers/*/test_*.py.)"""

from pathlib import Path

import numpy as np
import pytest

from ddl_apps.errors import CheckpointError
from ddl_apps.trainers import onnx_export
from tests.engine_runs import PROBE, ddl


def run_without_model(tmp_path: Path, recipe: str) -> Path:
    """A run directory holding only the resolved config of `recipe` (a run that never exported its model)."""
    shown = ddl("show", recipe)
    assert shown.returncode == 0, shown.stderr
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(shown.stdout)
    return run


def assert_refused(result, *phrases: str) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def test_a_run_without_an_exported_model_is_refused_and_nothing_written(tmp_path):
    run = run_without_model(tmp_path, "churn_tabm")
    assert_refused(ddl("export", str(run), "--format", "onnx"), "has no exported model", "did the run finish?")
    assert [p.name for p in run.iterdir()] == ["config.yaml"]


def test_an_unknown_format_is_a_usage_error(tmp_path):
    run = run_without_model(tmp_path, "churn_tabm")
    assert_refused(ddl("export", str(run), "--format", "tflite", "-o", str(tmp_path / "m.tflite")),
                   "Invalid value for '--format'", "'onnx'")
    assert not (tmp_path / "m.tflite").exists()


def test_an_output_that_exists_or_has_no_folder_is_refused(tmp_path):
    run = run_without_model(tmp_path, "churn_tabm")
    taken = tmp_path / "model.onnx"
    taken.write_text("the user's own file")
    assert_refused(ddl("export", str(run), "-o", str(taken)), f"{taken} already exists", "another file with -o")
    assert taken.read_text() == "the user's own file"
    assert_refused(ddl("export", str(run), "-o", str(tmp_path / "nowhere" / "model.onnx")), "does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_a_directory_that_is_no_run_and_a_trainer_without_export_are_named(tmp_path):
    assert_refused(ddl("export", str(tmp_path)), "is not a run directory")
    probe = run_without_model(tmp_path, PROBE)
    assert_refused(ddl("export", str(probe)), "cannot export to ONNX")


def test_a_conversion_that_fails_leaves_no_file(tmp_path):
    output = tmp_path / "model.onnx"

    def half_written(path: Path) -> dict[str, np.ndarray]:
        path.write_bytes(b"half a graph")
        raise CheckpointError("conversion failed")

    with pytest.raises(CheckpointError, match="conversion failed"):
        onnx_export.write_onnx(output, half_written, [], {})
    assert list(tmp_path.iterdir()) == []
