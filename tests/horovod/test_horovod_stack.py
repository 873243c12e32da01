"""Issue 2: the Horovod build works under horovodrun -np 2 with Gloo and with MPI."""

import json
import subprocess
from pathlib import Path

import pytest

from ddl_apps.core.launch import CONTROLLERS, horovodrun_executable
from tests.engine_runs import launch_worker


def test_check_build_lists_frameworks_and_controllers():
    report = subprocess.run([horovodrun_executable(), "--check-build"], capture_output=True, text=True).stdout
    for component in ("TensorFlow", "PyTorch", "MPI", "Gloo"):
        assert f"[X] {component}" in report, report


def test_the_recorded_build_is_what_the_extensions_answer():
    """Patch python/0016: horovodrun reads whether Horovod was built with Gloo, MPI... from the record setup wrote,
    instead of loading an extension to ask on every launch; the record holds what the extension answers."""
    from horovod.common import util

    recorded = json.loads(Path(util.BUILT_RECORD).read_text())
    asked = {name: util._check_extension_lambda("torch", lambda ext, name=name: getattr(ext, f"{name}_built")(),
                                                f"built with {name}", False) for name in recorded}
    assert recorded == asked and recorded["mpi"] and recorded["gloo"], (recorded, asked)


@pytest.mark.distributed
@pytest.mark.parametrize("controller", CONTROLLERS)
@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_collectives_exact(framework, controller):
    output = launch_worker(f"collectives_{framework}.py", controller)
    for rank in range(2):
        assert f"collectives ok on rank {rank} of 2" in output


@pytest.mark.distributed
@pytest.mark.parametrize("controller", CONTROLLERS)
def test_torch_distributed_optimizer_matches_combined_batch(controller):
    output = launch_worker("torch_distributed_optimizer.py", controller)
    for rank in range(2):
        assert f"rank {rank}: identical across 2 ranks" in output


@pytest.mark.distributed
@pytest.mark.parametrize("controller", CONTROLLERS)
def test_torch_step_interrupted_while_submitting_a_group_is_undone_by_load_state_dict(controller):
    """Patch python/0013: without it the interrupted rank's next steps send other collectives and the job hangs."""
    output = launch_worker("torch_interrupted_step.py", controller, timeout=90)
    for rank in range(2):
        assert f"rank {rank}: identical after an interrupted step" in output
