"""Implicit-feedback interactions: reading, the leave-one-out split by time, and the sampled negatives.

The default data is MovieLens-100k as the PyPI package `recbole` 1.2.1 ships it (read from the installed
package: GroupLens' terms forbid redistributing it): 100,000 ratings by 943 users of 1,682 films, each rating
taken as an interaction. Users bring a CSV of (user, item, timestamp[, anything else]) instead.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ddl_apps.errors import DataError
from ddl_apps.trainers.file_inputs import as_strings, check_columns, file_identity, read_text_table
from ddl_apps.trainers.packaged import packaged_file
from ddl_apps.trainers.recsys.config import MOVIELENS_100K, DataConfig

if TYPE_CHECKING:
    from ddl_apps.data.prepare import DatasetWriter
    from ddl_apps.recipe import Recipe

MOVIELENS_FOLDER = "dataset_example/ml-100k"


@dataclass
class Interactions:
    """One row per (user, item) pair, as indices into `user_ids` / `item_ids` (the ids as the data writes them)."""

    users: np.ndarray
    items: np.ndarray
    times: np.ndarray
    user_ids: list[str]
    item_ids: list[str]
    titles: dict[str, str]  # item id -> title, where known

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


def read_recbole_file(suffix: str) -> pd.DataFrame:
    """One of recbole's ml-100k files (tab-separated, as text), its headers without their types (user_id:token)."""
    what = f"the {MOVIELENS_100K!r} data (or set data.source to a CSV of your own)"
    frame = pd.read_csv(packaged_file("recbole", f"{MOVIELENS_FOLDER}/ml-100k.{suffix}", what), sep="\t", dtype=str)
    return frame.rename(columns=lambda c: c.split(":")[0])


def read_movielens_100k() -> tuple[pd.DataFrame, dict[str, str]]:
    """Interactions (user, item, timestamp as text) and film titles with their year."""
    ratings, films = read_recbole_file("inter"), read_recbole_file("item")
    titles = {i: f"{t} ({y})" if isinstance(y, str) else t
              for i, t, y in zip(films["item_id"], films["movie_title"], films["release_year"], strict=True)}
    return ratings[["user_id", "item_id", "timestamp"]].set_axis(["user", "item", "timestamp"], axis=1), titles


def read_own(path: Path, cfg: DataConfig) -> tuple[pd.DataFrame, dict[str, str]]:
    """The interactions (user, item, timestamp as text) of a CSV / TSV / JSON-lines file, and titles if given."""
    frame = read_text_table(path, f"a CSV of (user, item, timestamp), or to {MOVIELENS_100K!r}")
    wanted = [cfg.user_column, cfg.item_column, cfg.time_column]
    check_columns(frame, wanted, path, "Set data.user_column, data.item_column and data.time_column to the right ones")
    frame = frame[wanted].apply(as_strings).set_axis(["user", "item", "timestamp"], axis=1)
    blank = frame.index[(frame["user"] == "") | (frame["item"] == "")]
    if len(blank):
        raise DataError(f"{path}: row {blank[0] + 2} (counting the header as 1) has an empty user or item")
    return frame, read_titles(Path(cfg.titles), cfg.item_column) if cfg.titles else {}


def read_titles(path: Path, item_column: str) -> dict[str, str]:
    titles = read_text_table(path, "(data.titles) a CSV of item ids and titles, or leave data.titles out")
    check_columns(titles, [item_column, "title"], path, "data.titles needs the item column and a 'title' column")
    return dict(zip(titles[item_column].astype(str), titles["title"].astype(str), strict=True))


def to_interactions(frame: pd.DataFrame, titles: dict[str, str], source: str) -> Interactions:
    """Index users and items; keep each (user, item) pair once, at its first time."""
    times = pd.to_numeric(frame["timestamp"], errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(times))
    if len(bad):
        raise DataError(f"{source}: row {bad[0] + 2} has timestamp {frame['timestamp'].iloc[bad[0]]!r}, not a "
                        "number; timestamps order each user's interactions (seconds, or any increasing number)")
    user_ids, users = np.unique(frame["user"].to_numpy(str), return_inverse=True)
    item_ids, items = np.unique(frame["item"].to_numpy(str), return_inverse=True)
    order = np.lexsort((np.arange(len(times)), times, users))  # by user, then time, then file order
    _, first = np.unique(users[order] * len(item_ids) + items[order], return_index=True)
    keep = np.sort(order[first])
    return Interactions(users[keep].astype(np.int64), items[keep].astype(np.int64), times[keep],
                        [str(u) for u in user_ids], [str(i) for i in item_ids], titles)


def load_interactions(cfg: DataConfig) -> Interactions:
    if cfg.source == MOVIELENS_100K:
        frame, titles = read_movielens_100k()
    else:
        frame, titles = read_own(Path(cfg.source), cfg)
    if frame.empty:
        raise DataError(f"{cfg.source} has no interactions")
    return to_interactions(frame, titles, cfg.source)


@dataclass
class LeaveOneOut:
    """Interaction row indices: each user's last interaction in time is the test item; the validation item is
    one of the user's earlier interactions, drawn at random (as in the NeuMF paper, so the most recent history
    stays in training) or the one just before the test item; the rest train. Users with fewer than 3
    interactions are trained on, not evaluated."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def leave_one_out(data: Interactions, valid_item: str, seed: int) -> LeaveOneOut:
    order = np.lexsort((np.arange(len(data.users)), data.times, data.users))
    users = data.users[order]
    count = np.bincount(users, minlength=data.num_users)
    from_end = np.cumsum(count)[users] - 1 - np.arange(len(users))  # 0 = the user's last interaction
    evaluated = count[users] >= 3
    if not evaluated.any():
        raise DataError("no user has 3 or more interactions, so there is nothing to hold out for validation and "
                        "test; leave-one-out needs users with a history")
    test = evaluated & (from_end == 0)
    if valid_item == "previous":
        valid = evaluated & (from_end == 1)
    else:  # the earlier interaction with the highest random key, per user
        earlier = np.flatnonzero(evaluated & (from_end >= 1))
        keys = np.random.default_rng(seed).random(len(earlier))
        by_user = earlier[np.lexsort((keys, users[earlier]))]
        last_of_user = np.r_[users[by_user][1:] != users[by_user][:-1], True]
        valid = np.zeros(len(users), dtype=bool)
        valid[by_user[last_of_user]] = True
    return LeaveOneOut(train=np.sort(order[~test & ~valid]), valid=np.sort(order[valid]), test=np.sort(order[test]))


class SeenItems:
    """Which (user, item) pairs occurred: membership by binary search over sorted pair keys (user x items + item),
    which may be a memory-mapped array, so that no worker holds its own copy of every interaction."""

    def __init__(self, keys: np.ndarray, num_items: int, per_user: np.ndarray | None = None):
        self.keys, self.num_items, self.per_user = keys, num_items, per_user

    @classmethod
    def of(cls, users: np.ndarray, items: np.ndarray, num_items: int) -> SeenItems:
        return cls(np.unique(users * num_items + items), num_items,
                   np.bincount(users, minlength=int(users.max()) + 1 if len(users) else 0))

    def by_user(self, num_users: int) -> list[list[int]]:
        """Each user's items, in order of the users (the keys are sorted by user, then item)."""
        bounds = np.searchsorted(self.keys, np.arange(num_users + 1) * self.num_items)
        items = (self.keys % self.num_items).tolist()
        return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users * self.num_items + items
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[at] == keys


def unseen_distinct(users: np.ndarray, count: int, seen: SeenItems, seed: int) -> np.ndarray:
    """[len(users), count] distinct items each user never interacted with, drawn uniformly (rejection sampling
    in a few vectorised rounds; a user with few unseen items is finished from the explicit list)."""
    assert seen.per_user is not None
    unseen = seen.num_items - seen.per_user[users]
    if len(users) and unseen.min() < count:
        raise DataError(f"user index {users[np.argmin(unseen)]} has only {unseen.min()} unseen items, fewer than "
                        f"data.eval_negatives={count}; lower it or add items")
    rng = np.random.default_rng(seed)
    result = np.zeros((len(users), count), dtype=np.int64)
    todo = np.arange(len(users))
    for _ in range(4):
        draws = rng.integers(seen.num_items, size=(len(todo), 2 * count))
        usable = ~seen.contains(users[todo, None], draws) & first_in_row(draws)
        done = usable.sum(axis=1) >= count
        for row in np.flatnonzero(done):
            result[todo[row]] = draws[row, usable[row]][:count]
        todo = todo[~done]
    for row in todo:
        candidates = np.flatnonzero(~seen.contains(np.full(seen.num_items, users[row]), np.arange(seen.num_items)))
        result[row] = rng.choice(candidates, count, replace=False)
    return result


def first_in_row(values: np.ndarray) -> np.ndarray:
    """True where a value appears for the first time in its row."""
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    repeat = np.zeros_like(ordered, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    first = np.empty_like(repeat)
    np.put_along_axis(first, order, ~repeat, axis=1)
    return first


def candidates(data: Interactions, rows: np.ndarray, seen: SeenItems, negatives: int, seed: int) -> np.ndarray:
    """Per held-out interaction: its item in column 0, then `negatives` items its user never touched."""
    users = data.users[rows]
    return np.hstack([data.items[rows, None], unseen_distinct(users, negatives, seen, seed)])


GOLDEN, UINT64 = 0x9E3779B97F4A7C15, (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: uint64 -> well-spread uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> 30)) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> 27)) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> 31)


def sampled_negatives(users: np.ndarray, rows: np.ndarray, epoch: int, seed: int, count: int,
                      seen: SeenItems) -> np.ndarray:
    """[len(rows), count] items each row's user has not trained on, drawn afresh each epoch. Item j of row r is a
    hash of (seed, epoch, r, j, attempt) modulo the number of items, the attempt counting up while the item is one
    the user has seen: the draws of a row do not depend on the batch or the worker it lands on, nor on any
    generator's state, so they are the same at any number of workers and after a resume."""
    base = _mix(np.asarray([(seed * GOLDEN ^ (epoch + 1)) & UINT64], dtype=np.uint64))
    slots = np.asarray(rows[:, None] * count + np.arange(count), dtype=np.uint64)
    attempts = np.zeros(slots.shape, dtype=np.uint64)

    def draw(where: np.ndarray | slice) -> np.ndarray:
        hashed = _mix(base ^ _mix(slots[where] ^ (attempts[where] << np.uint64(40))))
        return (hashed % np.uint64(seen.num_items)).astype(np.int64)

    items = draw(slice(None))
    clash = seen.contains(np.broadcast_to(users[:, None], items.shape), items)
    while clash.any():
        attempts[clash] += np.uint64(1)
        items[clash] = draw(clash)
        clash[clash] = seen.contains(np.broadcast_to(users[:, None], items.shape)[clash], items[clash])
    return items


SPLITS = ("train", "valid", "test")
SEEN, POPULARITY, HISTORY, CATALOGUE = "train-seen.npy", "popularity.npy", "history.npz", "catalogue.json"
HELD_OUT = {"user": "int64", "items": "int64"}  # the user, the held-out item, then the negatives
COLUMNS = {"train": {"user": "int64", "item": "int64"}, "valid": HELD_OUT, "test": HELD_OUT}


def write_prepared(recipe: Recipe, writer: DatasetWriter) -> dict[str, Any]:
    """The leave-one-out split, the evaluation candidates, and beside them: the sorted (user, item) keys of the
    training interactions (memory-mapped by each worker for negative sampling), every item's training count (the
    most-popular baseline), each user's interactions and the ids and titles (for `ddl recommend`). The
    interactions are read whole, once."""
    cfg = recipe.data
    data = load_interactions(cfg)
    split = leave_one_out(data, cfg.valid_item, cfg.eval_seed)
    train_seen = SeenItems.of(data.users[split.train], data.items[split.train], data.num_items)
    assert train_seen.per_user is not None
    if train_seen.per_user.max(initial=0) >= data.num_items:
        raise DataError(f"user {data.user_ids[int(train_seen.per_user.argmax())]} interacted with every item in "
                        "training, so no negative item can be sampled for it; drop that user or add items")
    every_seen = SeenItems.of(data.users, data.items, data.num_items)
    writer.plan("train", len(split.train), cfg.eval_seed)
    for start in range(0, len(split.train), 1 << 16):
        rows = split.train[start : start + (1 << 16)]
        writer.add("train", {"user": data.users[rows], "item": data.items[rows]})
    for offset, (name, rows) in enumerate((("valid", split.valid), ("test", split.test))):
        writer.add(name, {"user": data.users[rows],
                          "items": candidates(data, rows, every_seen, cfg.eval_negatives, cfg.eval_seed + offset)})
    writer.add_file(SEEN, npy_bytes(train_seen.keys))
    writer.add_file(POPULARITY, npy_bytes(np.bincount(data.items[split.train], minlength=data.num_items)))
    history = io.BytesIO()
    np.savez(history, users=data.users, items=data.items)
    writer.add_file(HISTORY, history.getvalue())
    writer.add_file(CATALOGUE, json.dumps({"users": data.user_ids, "items": data.item_ids,
                                           "titles": data.titles}).encode())
    return {"num_users": data.num_users, "num_items": data.num_items}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def source_identity(recipe: Recipe) -> dict[str, Any]:
    identity = file_identity(recipe.data.source, recipe.data.source == MOVIELENS_100K)
    return identity | ({"titles": file_identity(recipe.data.titles, False)} if recipe.data.titles else {})
