"""Fixtures that tests in several folders share, and how `pytest -n 2` (pytest-xdist) shares the tests out."""

import os

import pytest

from tests.mlflow_server import mlflow_server

# The tests' processes write logs as a file does (a run's output under SLURM, a pipe): the xdist workers inherit the
# terminal's size from the controller (readline exports COLUMNS), which would cut every table a run prints to it.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

# Modules whose tests build the same hosts on fixed addresses (network namespaces, SSH servers, SLURM, containers
# and the image build's wheel server): one worker runs them, one after another.
ONE_AT_A_TIME = {"test_multihost.py", "test_slurm.py", "test_images.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs pytest -n 2: each worker is given whole modules (a module's runs, trained once by its
    module-scoped fixtures, serve all its tests), and the host-building modules as one unit."""
    from xdist.scheduler import LoadFileScheduling

    class WholeModules(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return "hosts" if module.rsplit("/", 1)[-1] in ONE_AT_A_TIME else module

    return WholeModules(config, log)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """A real MLflow tracking server on the loopback address for the whole session (started on first use)."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url
