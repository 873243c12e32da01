"""Early stopping's rule and its errors (the runs that stop early are in test_engines.py and test_elastic.py)."""

import math

import pytest

from ddl_apps.core.early_stopping import EarlyStopping
from ddl_apps.errors import RecipeError
from ddl_apps.recipe import EarlyStoppingConfig


def watch(values: list[float], **config) -> EarlyStopping:
    stopping = EarlyStopping(EarlyStoppingConfig(metric="m", **config))
    for epoch, value in enumerate(values, 1):
        stopping.update({"m": value, "other": 0.0}, epoch, 10 * epoch, lambda epoch=epoch: {"epoch": epoch})
    return stopping


@pytest.mark.parametrize("values,config,best_epoch,stale", [
    ([0.5, 0.6, 0.6, 0.55], {"patience": 3}, 2, 2),  # a tie is no improvement
    ([0.5, 0.6, 0.605, 0.7], {"min_delta": 0.01}, 4, 0),  # nor a gain of min_delta or less
    ([3.0, 2.0, 2.5, 1.0], {"mode": "min"}, 4, 0),
    ([math.nan, 0.4, math.nan], {}, 2, 1),  # NaN never improves
])
def test_the_best_evaluation_and_the_evaluations_since(values, config, best_epoch, stale):
    stopping = watch(values, **config)
    assert (stopping.best_epoch, stopping.best_step, stopping.stale) == (best_epoch, 10 * best_epoch, stale)
    assert stopping.weights == {"epoch": best_epoch}


def test_it_stops_after_patience_evaluations_without_an_improvement():
    assert not watch([0.5, 0.4], patience=2).stopped
    assert watch([0.5, 0.4, 0.45], patience=2).stopped


def test_a_state_for_another_metric_starts_afresh():
    saved = watch([0.5, 0.4]).state_dict()
    same, other = EarlyStopping(EarlyStoppingConfig(metric="m")), EarlyStopping(EarlyStoppingConfig(metric="n"))
    same.load_state_dict(saved)
    other.load_state_dict(saved)
    assert same.state_dict() == saved
    assert (other.best, other.stale, other.weights) == (None, 0, None)


def test_a_metric_the_recipe_does_not_report_names_those_it_does():
    stopping = EarlyStopping(EarlyStoppingConfig(metric="auc"))
    with pytest.raises(RecipeError, match=r"metric='auc' is not a validation metric .* it reports m, other: set"):
        stopping.update({"m": 1.0, "other": 2.0}, 1, 10, dict)
