"""Experiment tracking in MLflow, on rank 0: the resolved recipe as parameters, every metric the run log records
with its step, the final results, the run directory's files and the exported model in its framework's flavour.

Tracking is on when MLFLOW_TRACKING_URI is set, or when the recipe sets run.mlflow (then in a local store,
./mlruns/: a SQLite database beside the artifacts). MLflow is imported only then. The MLflow run's id is kept in
the run directory, so `--resume`, and a new rank 0 after an elastic resize, go on with the same MLflow run.
Tracking never stops training: a server that cannot be reached, or any error later, is one warning, and the run
directory holds everything the run records without it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import json
import os
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from ddl_apps.core import rundir
from ddl_apps.core.contract import TrackedModel
from ddl_apps.recipe import Recipe

RUN_FILE = "mlflow_run.json"  # the tracking URI and the MLflow run id, in the run directory
LOCAL_STORE = Path("mlruns")
MODEL = "model"  # the logged model's name (its files' artifact folder when it is logged as files)
RUN_FILES = (".json", ".jsonl", ".yaml", ".png", ".csv")  # what is logged of the run directory's top level
SEND_EVERY_S = 5.0  # metrics are sent in batches, in a thread of their own, at most this often, and at the end
PARAM_LIMIT = 6000  # MLflow's longest parameter value
CUT = " ... (cut; config.yaml holds it whole)"
# MLflow's client retries a failed request 7 times over about 2 minutes: a server that fails should cost seconds
# (2 retries, 2 s). Its own log (database set-up, pip requirements...) stays out of the run's. The environment wins.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_LOGGING_LEVEL": "ERROR",
                   "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

# What a transformers pipeline needs: MLflow's default requirements also name torchvision, whose version it reads
# by importing it (here a failure: torchvision is not installed)
TRANSFORMERS_NEEDS = ("transformers", "torch")

CONNECT_S = 5  # how long a tracking server's port may take to answer, before the client is made

Say = Callable[[str], None]


def tracking_uri(recipe: Recipe) -> str | None:
    """MLFLOW_TRACKING_URI, else the local store when run.mlflow is set, else None (no tracking)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(LOCAL_STORE / 'mlflow.db').resolve()}" if recipe.run.mlflow else None


def params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved recipe as config.yaml holds it (secrets redacted), flattened to dotted keys; values that are
    not text as JSON; a value longer than MLflow takes is cut, saying so."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(params(value, f"{prefix}{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[f"{prefix}{key}"] = text if len(text) <= PARAM_LIMIT else text[: PARAM_LIMIT - len(CUT)] + CUT
    return flat


def metric_key(*parts: str) -> str:
    """('model (test)', 'roc_auc') -> 'model test/roc_auc': MLflow's names take letters, digits, _ - . : space and /."""
    return "/".join(" ".join(re.sub(r"[^\w\-.: ]", " ", part).split()) for part in parts)


def why(error: Exception) -> str:
    """The cause of a failed MLflow call in a few words: the OS error of a failed connection, else the message's
    first line."""
    text = str(error).strip()
    if isinstance(error, OSError) and error.errno:
        return text
    refused = re.search(r"Max retries exceeded.*?(\[Errno [^\]]+\][^'\")]*)", text)
    return refused.group(1) if refused else f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


class Tracker:
    """No tracking: on ranks other than 0, in runs without MLflow, and once tracking failed."""

    def metrics(self, split: str, step: int, values: dict[str, float]) -> None: ...
    def model(self, tracked: Callable[[], TrackedModel | None], model_dir: Path) -> None: ...
    def close(self, results: dict[str, dict[str, float]] | None, run_ended: bool) -> None: ...
    def failed(self) -> None: ...


def start(recipe: Recipe, run_dir: Path, say: Say) -> Tracker:
    """Rank 0: the run's MLflow run, opened (or reopened) with its parameters logged; no tracking when it is off or
    the store cannot be reached (one warning)."""
    uri = tracking_uri(recipe)
    if uri is None:
        return Tracker()
    for name, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        check_reachable(uri)
        return MlflowTracker(uri, recipe, run_dir, say)
    except Exception as e:  # anything the client raises: tracking never stops training
        say(off_warning(uri, run_dir, e, "cannot be reached"))
        return Tracker()


def check_reachable(uri: str) -> None:
    """An HTTP(S) server's port answers within CONNECT_S, or OSError: a host that drops packets would cost MLflow's
    timeout at every retry. (Not through a proxy: the proxy is what answers there.)"""
    url = urllib.parse.urlsplit(uri)
    if url.scheme not in ("http", "https") or not url.hostname:
        return
    if urllib.request.getproxies().get(url.scheme) and not urllib.request.proxy_bypass(url.hostname):
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    socket.create_connection((url.hostname, port), timeout=CONNECT_S).close()


def off_warning(uri: str, run_dir: Path, error: Exception, what: str) -> str:
    return (f"warning: MLflow tracking at {uri} {what} ({why(error)}); the run goes on untracked, and {run_dir} "
            "holds everything it records")


class MlflowTracker(Tracker):
    def __init__(self, uri: str, recipe: Recipe, run_dir: Path, say: Say):
        from mlflow import MlflowClient

        self.uri, self.run_dir, self.say = uri, run_dir, say
        self.client = MlflowClient(uri)
        self.pending: list[Any] = []
        self.sent_at = time.monotonic()
        self.sending: threading.Thread | None = None
        self.send_error: Exception | None = None
        self.stopped = False  # after its one warning, tracking tries nothing more
        self.step = 0  # the last step metrics were recorded at
        self.run_id = self._reopen() or self._create(recipe)
        self._log_params(params(rundir.resolved_config(recipe, run_dir)))

    def _reopen(self) -> str | None:
        """The run directory's MLflow run (a resumed run, or a new rank 0 after a resize), marked running again."""
        path = self.run_dir / RUN_FILE
        earlier = json.loads(path.read_text()) if path.is_file() else {}
        if earlier.get("tracking_uri") != self.uri:
            return None
        self.client.update_run(earlier["run_id"], status="RUNNING")
        return earlier["run_id"]

    def _create(self, recipe: Recipe) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or recipe.name or recipe.trainer
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                     tags={"ddl.trainer": recipe.trainer, "ddl.run_dir": str(self.run_dir.resolve())})
        (self.run_dir / RUN_FILE).write_text(json.dumps({"tracking_uri": self.uri, "run_id": run.info.run_id}))
        return run.info.run_id

    def _log_params(self, new: dict[str, str]) -> None:
        """MLflow keeps a run's parameters as first logged: on --resume only new keys are logged, and changed
        values are named."""
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        changed = sorted(key for key in new.keys() & logged.keys() if new[key] != logged[key])
        if changed:
            self.say(f"note: MLflow keeps the parameters the run started with; changed since: {', '.join(changed)} "
                     f"(config.yaml holds the new values)")
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in new.items() if k not in logged])

    def _safely(self, action: Callable[[], None]) -> None:
        if self.stopped:
            return
        try:
            action()
        except Exception as e:  # tracking never stops training
            self.stopped = True
            self.say(off_warning(self.uri, self.run_dir, e, "failed"))

    def metrics(self, split: str, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if self.stopped:
            return
        now, self.step = int(time.time() * 1000), max(self.step, step)
        self.pending += [Metric(metric_key(split, key), float(value), now, step) for key, value in values.items()
                         if isinstance(value, int | float)]
        if time.monotonic() - self.sent_at >= SEND_EVERY_S and not (self.sending and self.sending.is_alive()):
            self._safely(self._send)

    def _send(self) -> None:
        """The pending metrics to MLflow in a thread, so that training does not wait for the server (a batch of
        hundreds takes a tenth of a second); the previous batch's error, if any, is raised here."""
        self._raise_send_error()
        batch, self.pending, self.sent_at = self.pending, [], time.monotonic()
        self.sending = threading.Thread(target=self._log_batch, args=(batch,), daemon=True)
        self.sending.start()

    def _log_batch(self, batch: list[Any]) -> None:
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as e:  # (reported on the training thread)
            self.send_error = e

    def _raise_send_error(self) -> None:
        if self.send_error is not None:
            raise self.send_error

    def _flush(self) -> None:
        """Every metric sent, now."""
        if self.sending:
            self.sending.join()
        self._raise_send_error()
        self.client.log_batch(self.run_id, metrics=self.pending)
        self.pending = []

    def model(self, tracked: Callable[[], TrackedModel | None], model_dir: Path) -> None:
        self._safely(lambda: self._log_model(tracked(), model_dir))

    def _log_model(self, tracked: TrackedModel | None, model_dir: Path) -> None:
        """In its flavour, with its signature (inferred from what the model makes of the example) and the example;
        a task that gives none: its exported files. (Keras prints a progress bar as the flavour checks the model.)"""
        if tracked is None:
            self.client.log_artifacts(self.run_id, str(model_dir), MODEL)
            return
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id), contextlib.redirect_stdout(io.StringIO()):
            if tracked.flavour == "keras":
                log_keras(tracked)
            elif tracked.flavour == "transformers":
                importlib.import_module("mlflow.transformers").log_model(
                    tracked.model, name=MODEL, task=tracked.task, input_example=tracked.example,
                    pip_requirements=pinned(TRANSFORMERS_NEEDS))
            else:  # (torch.export's graph: MLflow's pt2 format, no pickle; the signature's -1 axes stay dynamic)
                importlib.import_module("mlflow.pytorch").log_model(tracked.model, name=MODEL,
                                                                    signature=torch_signature(tracked),
                                                                    input_example=tracked.example)

    def close(self, results: dict[str, dict[str, float]] | None, run_ended: bool) -> None:
        """The metrics still pending; at the end of a run also the results, the run directory's files and the run's
        status: FINISHED, or KILLED for a run stopped at run.max_steps (until --resume finishes it)."""
        for row, values in (results or {}).items():  # (at the last step the run log recorded)
            self.metrics(row, self.step, values)
        self._safely(self._flush)
        if run_ended:
            self._safely(self._finish_run if results else lambda: self._end_run("KILLED"))

    def failed(self) -> None:
        """The run stopped on an error: what it logged, and the status FAILED (--resume reopens it)."""
        self._safely(self._flush)
        self._safely(lambda: self._end_run("FAILED"))

    def _finish_run(self) -> None:
        for path in sorted(self.run_dir.iterdir()):
            if path.is_file() and path.suffix in RUN_FILES and path.name != RUN_FILE:
                self.client.log_artifact(self.run_id, str(path))
        self._end_run("FINISHED")

    def _end_run(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def pinned(packages: tuple[str, ...]) -> list[str]:
    """Requirements pinned to the installed versions (without a local label such as +cpu, which PyPI lacks)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in packages]


class KerasFolderFirst:
    """MLflow 3.17's keras flavour writes the input example before it makes the model's folder (FileNotFoundError):
    its save_model, with the folder made first."""

    @staticmethod
    def save_model(path: str, **options: Any) -> None:
        import mlflow.keras

        os.makedirs(path)
        mlflow.keras.save_model(path=path, **options)


def torch_signature(tracked: TrackedModel) -> Any:
    """The signature of what the module makes of its example, with its variable axes (and the batch's) as -1."""
    import torch
    from mlflow.models import infer_signature
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    with torch.no_grad():
        outputs = tracked.model(torch.from_numpy(tracked.example)).numpy()
    inferred = infer_signature(tracked.example, outputs)

    def variable(schema: Schema) -> Schema:
        specs = cast(list[TensorSpec], schema.inputs)  # (numpy in and out: tensors)
        return Schema([TensorSpec(spec.type, tuple(-1 if axis in tracked.variable_axes else size
                                                   for axis, size in enumerate(spec.shape)), spec.name)
                       for spec in specs])

    return ModelSignature(variable(inferred.inputs), variable(inferred.outputs))


def log_keras(tracked: TrackedModel) -> None:
    """What mlflow.keras.log_model does, around KerasFolderFirst, with the signature it does not infer."""
    import mlflow.keras
    import numpy as np
    from mlflow.models import Model, infer_signature

    outputs = np.asarray(tracked.model(tracked.example, training=False))
    Model.log(None, name=MODEL, flavor=KerasFolderFirst, flavor_name="mlflow.keras", model=tracked.model,
              signature=infer_signature(tracked.example, outputs), input_example=tracked.example,
              pip_requirements=mlflow.keras.get_default_pip_requirements())
