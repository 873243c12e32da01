"""A real MLflow tracking server on the loopback address (SQLite backend store, artifacts proxied into a folder), and
reading a run back through MLflow's client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

STARTUP_S = 120  # creating the database's tables and starting uvicorn: 8 s here, longer on 2 busy cores
READY = "Uvicorn running on"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_until_ready(output: IO[str], log: IO[str], ready: threading.Event) -> None:
    """The server's output into its log file; `ready` is set once it says it listens (or once it has exited)."""
    for line in output:
        log.write(line)
        log.flush()
        if READY in line:
            ready.set()
    ready.set()


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 and a free port, storing into `folder`; its URL once /health answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts")]
    ready = threading.Event()
    with (folder / "server.log").open("w") as log, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as server:
        copier = threading.Thread(target=copy_until_ready, args=(server.stdout, log, ready), daemon=True)
        copier.start()
        try:
            assert ready.wait(STARTUP_S) and server.poll() is None, (folder / "server.log").read_text()
            with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
                assert response.status == 200
            yield url
        finally:
            server.terminate()
            server.wait(timeout=30)
            copier.join(timeout=10)


def tracked_run(uri: str, run_dir: Path):
    """The MLflow run a run directory names, read back from the tracking server."""
    from mlflow import MlflowClient

    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    return MlflowClient(uri).get_run(run_id)


def logged_model(uri: str, run_dir: Path):
    """The model logged with the run directory's MLflow run, loaded as MLflow's generic pyfunc (its input example
    with it), and its signature."""
    import mlflow

    run_id = tracked_run(uri, run_dir).info.run_id
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    return model, model.metadata.get_input_schema()
