"""Sources of examples for a task's splits."""

from __future__ import annotations

from typing import Any

import numpy as np


class ColumnSource:
    """Equal-length columns (numpy arrays or torch tensors) served by index: the fast path for tabular and
    fixed-size data. For a Keras task, columns `x` and `y` feed the tf.data pipeline."""

    def __init__(self, **columns: Any):
        lengths = {len(c) for c in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns differ in length: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def take(self, indices: np.ndarray) -> dict[str, Any]:
        return {k: v[indices] for k, v in self.columns.items()}
