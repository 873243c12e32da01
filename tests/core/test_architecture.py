"""The core's imports: no cycle among its modules (every import counted, those inside functions and under
TYPE_CHECKING too) and nothing from the trainers or their registry: trainers plug into the core, not the reverse."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ddl_apps
from tests.engine_runs import PROBE, ddl

PACKAGE = Path(ddl_apps.__file__).parent
CORE = "ddl_apps.core"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """The ddl_apps modules a file imports (`from package import submodule` counts as the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in modules)
    return {name for name in found if name.startswith("ddl_apps")}


def core_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    core = {name: path for name, path in files.items() if name.startswith(CORE)}
    return {name: imported(path, set(files)) for name, path in core.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting, done = [], set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return [*visiting[visiting.index(node):], node]
        if node in done or node not in graph:
            return None
        visiting.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    return next((cycle for node in sorted(graph) if (cycle := visit(node))), None)


def test_the_walk_finds_a_cycle_and_a_clean_graph():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert "ddl_apps.core.dist" in core_graph()["ddl_apps.core.engine"]


def test_no_import_cycle_among_the_core_modules():
    graph = core_graph()
    internal = {name: {t for t in targets if t.startswith(CORE) and t != CORE} for name, targets in graph.items()}
    assert find_cycle(internal) is None, " -> ".join(find_cycle(internal))


def test_the_core_imports_no_trainer():
    outside = {name: sorted(t for t in targets if t.startswith(("ddl_apps.trainers", "ddl_apps.registry",
                                                                  "ddl_apps.cli")))
               for name, targets in core_graph().items()}
    assert not {name: targets for name, targets in outside.items() if targets}


KERAS_RUN = """
import sys, tempfile
from pathlib import Path
from ddl_apps.core import checkpoint, run_end, tf_engine, training
from ddl_apps.core.metrics import RunLog
log = RunLog(Path(tempfile.mkdtemp()), show_progress=False)
log.record("train", 1, {"loss": 0.5})
log.close()
checkpoint.save_state(Path(tempfile.mkdtemp()), "rng", {"by_rank": __import__("numpy").zeros((2, 3), "uint8")})
print("torch" in sys.modules)
"""


def test_a_keras_run_loads_no_torch():
    """What a Keras run imports of the core (its engine, the loop, checkpoints, the run log) leaves torch out."""
    result = subprocess.run([sys.executable, "-c", KERAS_RUN], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", result.stdout


@pytest.mark.distributed
def test_the_workers_of_a_pytorch_run_load_no_tensorflow(tmp_path, monkeypatch):
    """Both workers of a PyTorch run (rank 0 writing TensorBoard events) import torch and not TensorFlow, which
    TensorBoard's event writer used to import: 3.5 s and 160 MB more in rank 0."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # every process prints each module it imports
    run = tmp_path / "run"
    result = ddl("train", PROBE, f"run.dir={run}", "run.max_steps=10", "-np", "2", "--gloo")
    assert result.returncode == 0, result.stderr[-3000:]

    def importers(module: str) -> list[str]:  # horovodrun tags rank 1's lines; rank 0's reach us as they are
        return sorted(line.split("import time:")[0] for line in result.stderr.splitlines()
                      if line.endswith(f"| {module}"))

    assert importers("torch") == ["", "[1]<stderr>:"]
    assert importers("tensorflow") == []
    assert [events.stat().st_size > 0 for events in (run / "tensorboard").glob("events.out.tfevents.*")] == [True]
