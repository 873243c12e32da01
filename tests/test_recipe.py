"""Issue 4: recipes load, override and validate; every malformed recipe gives one clear error and exit code 2
before any worker starts."""

import pytest
import yaml

from ddl_apps.errors import RecipeError
from ddl_apps.recipe import load_recipe, parse_overrides
from tests.engine_runs import PROBE, REPO, ddl


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["optim.lr=3e-4", "dist.compression=fp16", "model.hidden=[64, 32]"]) == {
        "optim": {"lr": 3e-4}, "dist": {"compression": "fp16"}, "model": {"hidden": [64, 32]},
    }


def test_overrides_reach_the_trainer_sections():
    recipe = load_recipe("fraud_mlp", ["model.hidden=[64]", "data.rows=1000", "optim.lr=0.01"])
    assert recipe.model.hidden == [64] and recipe.data.rows == 1000 and recipe.optim.lr == 0.01


def test_all_problems_in_one_message():
    with pytest.raises(RecipeError) as error:
        load_recipe("fraud_mlp", ["optim.lrr=1", "model.hiden=[3]", "optim.epochs=many"])
    message = str(error.value)
    assert "optim.lrr: unknown key (did you mean 'lr'?)" in message
    assert "model.hiden: unknown key (did you mean 'hidden'?)" in message
    assert "optim.epochs" in message and "integer" in message


BROKEN = {
    "bad_yaml": ("trainer: fraud\noptim: {lr: [1e-3\n", "not valid YAML"),
    "wrong_type": ("trainer: fraud\noptim:\n  batch_size: big\n", "optim.batch_size"),
    "unknown_key": ("trainer: fraud\noptim:\n  learning_rate: 0.1\n", "unknown key"),
    "unknown_trainer": ("trainer: tabulr\n", "did you mean 'tabular'"),
    "not_a_mapping": ("- just\n- a list\n", "must be a YAML mapping"),
    "bad_value": ("trainer: fraud\ndist:\n  compression: fp8\n", "dist.compression"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_malformed_recipe_exits_2_and_starts_nothing(case, tmp_path):
    text, expected = BROKEN[case]
    recipe = tmp_path / f"{case}.yaml"
    recipe.write_text(text)
    result = ddl("train", str(recipe), f"run.dir={tmp_path / 'run'}", "-np", "2")
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and "horovodrun" not in result.stderr.lower()
    assert result.stderr.count("error:") == 1
    assert not (tmp_path / "run").exists()


def test_missing_recipe_file(tmp_path):
    result = ddl("train", str(tmp_path / "nope.yaml"), "-np", "2")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_bad_override_syntax():
    result = ddl("show", PROBE, "optim.lr")
    assert result.returncode == 2 and "section.key=value" in result.stderr


def test_recipes_lists_shipped_recipes_with_descriptions():
    listing = ddl("recipes").stdout
    for path in (REPO / "recipes").glob("*.yaml"):
        assert path.stem in listing
        assert yaml.safe_load(path.read_text())["description"][:30] in listing


def test_show_prints_the_resolved_config():
    shown = yaml.safe_load(ddl("show", "fraud_mlp", "optim.lr=0.5").stdout)
    assert shown["optim"]["lr"] == 0.5 and shown["trainer"] == "tabular" and shown["run"]["seed"] == 0
