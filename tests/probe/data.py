"""The probes' data, the same for both engines (and free of either framework, so that each probe imports only its
own): scikit-learn's digits, the training split by index or as a stream, and the accuracy."""

from importlib.util import find_spec
from pathlib import Path

import numpy as np

from ddl_apps.core import sharding
from ddl_apps.core.sources import ColumnSource


def digits(recipe) -> tuple[dict, dict]:
    """scikit-learn's digits scaled to [0, 1]: (train, valid) columns x (float32) and y (int64). Read from the file
    load_digits reads, without importing scikit-learn's datasets (1.1 s in each worker of every probe run)."""
    table = np.loadtxt(Path(find_spec("sklearn").origin).parent / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    x, n = (x / 16.0).astype(np.float32), recipe.data.train_examples
    x[recipe.data.nan_examples] = np.nan
    return {"x": x[:n], "y": y[:n]}, {"x": x[n:], "y": y[n:]}


class StreamedDigits:
    """The training digits as a StreamSource: each worker is handed its share of each global step, and nothing can
    read them by index (no __len__, no take), as with a stream from disk or object storage."""

    def __init__(self, columns: dict, seed: int):
        self._columns, self._seed = columns, seed
        self.examples = len(columns["x"])

    def rank_steps(self, epoch, first, global_batch, rank, size, micro_batches):
        order = sharding.epoch_order(self.examples, self._seed, epoch)
        for step in range(first, self.examples // global_batch):
            yield [{k: v[indices] for k, v in self._columns.items()}
                   for indices in sharding.rank_step_batches(order, step, global_batch, rank, size, micro_batches)]


class DigitsTask:
    """What both probe trainers share: data, metrics and the (absent) extra report."""

    def __init__(self, recipe, to_column=lambda a: a):
        train, valid = digits(recipe)
        self.hidden, self.failing_artifacts = recipe.model.hidden, recipe.model.failing_artifacts
        columns = {k: to_column(v) for k, v in train.items()}
        self.train = StreamedDigits(columns, recipe.run.seed) if recipe.data.stream else ColumnSource(**columns)
        self.valid = ColumnSource(**{k: to_column(v) for k, v in valid.items()})
        self.test = None

    def metrics(self, outputs):
        return {"accuracy": float(np.mean(outputs["pred"] == outputs["y"])), "examples": float(len(outputs["y"]))}

    def report(self):
        return {}

    def write_artifacts(self, run_dir, outputs):
        if self.failing_artifacts:
            raise ValueError("Found array with 0 feature(s)")
