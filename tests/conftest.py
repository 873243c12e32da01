"""Fixtures that tests in several folders share."""

import pytest

from tests.mlflow_server import mlflow_server


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """A real MLflow tracking server on the loopback address for the whole session (started on first use)."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url
