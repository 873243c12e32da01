"""What a run records: metrics as JSON lines, TensorBoard events, a PNG of the curves, progress and a summary.

Only rank 0 holds a `RunLog` that writes; other ranks get a `SilentLog` with the same methods.
"""

from __future__ import annotations

import json
import sys
import time
import types
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from io import FileIO
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from ddl_apps.console import stderr_console
from ddl_apps.core import tracking
from ddl_apps.core.contract import TrackedModel
from ddl_apps.recipe import Recipe

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


@dataclass
class Throughput:
    """Training samples (all ranks) and seconds spent in training steps in this process: no evaluation,
    checkpoints or start-up; the first steps' graph tracing or warm-up is included."""

    samples: int = 0
    seconds: float = 0.0

    def add(self, samples: int, seconds: float) -> None:
        self.samples += samples
        self.seconds += seconds

    def summary(self) -> dict[str, float]:
        return {"samples": self.samples, "seconds": round(self.seconds, 2),
                "samples_per_s": round(self.samples / self.seconds, 1) if self.seconds else 0.0}


class LossWindow:
    """This rank's losses since the last log line (the sum and count of the finite ones) and the samples trained."""

    def __init__(self):
        self.loss, self.steps, self.samples, self.started = 0.0, 0, 0, time.perf_counter()

    def add(self, losses: np.ndarray, samples: int) -> None:
        finite = np.isfinite(losses)
        self.loss += float(losses[finite].sum())
        self.steps += int(finite.sum())
        self.samples += samples

    def rate(self) -> float:
        return self.samples / max(1e-9, time.perf_counter() - self.started)


class SilentLog:
    """The log of a non-root rank: it records nothing."""

    def start(self, total_steps: int, done_steps: int = 0) -> None: ...
    def step(self, step: int, values: dict[str, float]) -> None: ...
    def advance(self, steps: int = 1) -> None: ...
    def record(self, split: str, step: int, values: dict[str, float]) -> None: ...
    def message(self, text: str) -> None: ...
    def model(self, tracked: Callable[[], TrackedModel | None], model_dir: Path) -> None: ...
    def close(self, summary: dict[str, dict[str, float]] | None = None, run_ended: bool = True) -> None: ...
    def failed(self) -> None: ...


class RunLog(SilentLog):
    """With a recipe, the run is also tracked in MLflow where the recipe or the environment asks (core/tracking.py):
    every value recorded here goes to the file, TensorBoard and the tracker alike."""

    def __init__(self, run_dir: Path, show_progress: bool = True, recipe: Recipe | None = None):
        self.run_dir = run_dir
        self.console = stderr_console()
        self._jsonl = _open_for_appending(run_dir / METRICS_FILE)
        self._tb = tensorboard_writer(run_dir / "tensorboard")
        self._show_progress = show_progress and self.console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last_print = 0.0
        self._total = self._done = self._started_at = 0
        self._start_time = time.monotonic()
        self._tracker = tracking.start(recipe, run_dir, self.message) if recipe else tracking.Tracker()

    def start(self, total_steps: int, done_steps: int = 0) -> None:
        self._total, self._done, self._started_at = total_steps, done_steps, done_steps
        self._start_time = time.monotonic()
        if not self._show_progress:
            return
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=self.console, transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=done_steps, info="")

    def advance(self, steps: int = 1) -> None:
        self._done += steps
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, steps)

    def step(self, step: int, values: dict[str, float]) -> None:
        """Training values every `log_every` steps: file, TensorBoard, and the progress line."""
        self.record("train", step, values)
        info = "  ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, info=info)
        elif time.monotonic() - self._last_print > 5:  # no terminal (e.g. under horovodrun): a line now and then
            self._last_print = time.monotonic()
            self.console.print(f"step {step}/{self._total}  {info}  eta {self._eta()}", highlight=False)

    def _eta(self) -> str:
        rate = (self._done - self._started_at) / max(1e-9, time.monotonic() - self._start_time)
        seconds = int((self._total - self._done) / rate) if rate > 0 else 0
        return f"{seconds // 60}:{seconds % 60:02d}"

    def record(self, split: str, step: int, values: dict[str, float]) -> None:
        row = {"split": split, "step": step, "time": round(time.time(), 3), **values}
        self._jsonl.write((json.dumps(row) + "\n").encode())  # one write per row: readers see whole lines
        for key, value in values.items():
            self._tb.add_scalar(f"{split}/{key}", value, step)
        self._tracker.metrics(split, step, values)

    def model(self, tracked: Callable[[], TrackedModel | None], model_dir: Path) -> None:
        """The exported model, to the tracker: what `tracked()` gives, in its flavour, or else its files."""
        self._tracker.model(tracked, model_dir)

    def message(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, highlight=False)
        else:
            self.console.print(text, highlight=False)

    def close(self, summary: dict[str, dict[str, float]] | None = None, run_ended: bool = True) -> None:
        """`run_ended`: False where this rank stops writing the log of a run that goes on (an elastic resize)."""
        if self._progress is not None:
            self._progress.stop()
        self._jsonl.close()
        self._tb.close()
        plot_curves(self.run_dir)
        self._tracker.close(summary, run_ended)
        if summary:
            self.console.print(summary_table(summary))

    def failed(self) -> None:
        """The run stops on an error (its message follows): the tracker says so."""
        self._tracker.failed()


NO_TENSORFLOW = "tensorboard.compat.notf"


def tensorboard_writer(log_dir: Path):
    """TensorBoard's own event writer (torch's would load torch into Keras runs). It reaches files through
    `tensorboard.compat.tf`, which imports TensorFlow whenever it is installed: 3.5 s and 160 MB more in rank 0 of
    every PyTorch run. Unless this process runs TensorFlow anyway, TensorBoard's switch for its builds without
    TensorFlow (a module named `tensorboard.compat.notf`) makes it use its own file-system stub instead."""
    if "tensorflow" not in sys.modules:
        sys.modules.setdefault(NO_TENSORFLOW, types.ModuleType(NO_TENSORFLOW))
    from tensorboard.summary import Writer

    return Writer(str(log_dir))


def _fmt(value: float) -> str:
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_table(summary: dict[str, dict[str, float]]) -> Table:
    """Rows: what was measured (e.g. 'model (test)', 'baseline (test)'); columns: the metrics."""
    columns = list(dict.fromkeys(k for row in summary.values() for k in row))
    table = Table(title="run summary")
    table.add_column("")
    for column in columns:
        table.add_column(column, justify="right")
    for name, row in summary.items():
        table.add_row(name, *(_fmt(row[c]) if c in row else "" for c in columns))
    return table


def _open_for_appending(path: Path) -> FileIO:
    """Unbuffered appends, after cutting off a row that a killed run left unfinished (a resume appends here)."""
    if path.exists():
        text = path.read_bytes()
        if not text.endswith(b"\n"):
            with path.open("r+b") as file:
                file.truncate(text.rfind(b"\n") + 1)
    return path.open("ab", buffering=0)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The finished rows: a row still being written (no newline yet) is left for the next read."""
    path = run_dir / METRICS_FILE
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def plot_curves(run_dir: Path) -> None:
    """One panel per metric, one line per split, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in read_metrics(run_dir):
        for key, value in row.items():
            if key not in ("split", "step", "time") and isinstance(value, int | float):
                series[key][row["split"]].append((row["step"], value))
    if not series:
        return
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for ax, (metric, splits) in zip(axes[0], sorted(series.items()), strict=True):
        for split, points in splits.items():
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=split)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / CURVES_FILE, dpi=90)
    plt.close(fig)
