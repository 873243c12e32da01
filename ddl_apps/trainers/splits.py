"""The stratified train / validation / test split that the trainers with labelled examples share."""

from __future__ import annotations

import numpy as np

from ddl_apps.errors import DataError


def stratified_split(labels: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Row indices of one part per fraction, then of the rest; each label spread over the parts in proportion.
    Indices stay in file order within a part, so a split does not depend on how rows are batched later."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        bounds = np.cumsum([0, *(int(np.floor(len(members) * f + 0.5)) for f in fractions)])
        for part, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            parts[part].append(members[start:stop])
        parts[-1].append(members[bounds[-1]:])
    return [np.sort(np.concatenate(p)) for p in parts]


def train_valid_test(labels: np.ndarray, test_fraction: float, valid_fraction: float, seed: int,
                     sample: int | None = None) -> dict[str, np.ndarray]:
    """Indices of each split, stratified by label; with `sample`, first a stratified sample of that many."""
    index = np.arange(len(labels))
    if sample is not None and sample < len(index):
        index = stratified_split(labels, [sample / len(index)], seed)[0]
    test, valid, train = (index[part] for part in stratified_split(labels[index], [test_fraction, valid_fraction],
                                                                    seed))
    if min(len(train), len(valid), len(test)) == 0:
        raise DataError(f"{len(index)} examples are too few for a train, validation and test split with at least "
                        "one example each; add examples (or raise the sample size)")
    return {"train": train, "valid": valid, "test": test}
