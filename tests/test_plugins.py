"""Trainers as plugins: a package installed on its own (tests/plugin_package, into a temporary folder) registers
its trainer under the entry-point group `ddl_apps.trainers`; its recipe is listed and trains like a shipped one."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine_runs import ddl

PLUGIN = Path(__file__).parent / "plugin_package"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The toy trainer package, installed with pip into a folder of its own (not into the environment)."""
    work = tmp_path_factory.mktemp("plugin")
    shutil.copytree(PLUGIN, work / "src")
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(work / "src")], check=True, capture_output=True)
    assert list(site.glob("ddl_toy_trainer-*.dist-info"))
    return site


def test_an_installed_plugin_recipe_is_listed_and_shown(plugin_site):
    listed = ddl("recipes", python_path=(plugin_site,))
    assert listed.returncode == 0, listed.stderr
    assert "toy_linear" in listed.stdout and "fraud_mlp" in listed.stdout
    shown = ddl("show", "toy_linear", "data.features=3", python_path=(plugin_site,))
    assert shown.returncode == 0 and "features: 3" in shown.stdout, shown.stderr
    bad = ddl("show", "toy_linear", "data.featurs=3", python_path=(plugin_site,))
    assert bad.returncode == 2 and "data.featurs: unknown key (did you mean 'features'?)" in bad.stderr


def test_without_the_plugin_its_recipe_and_trainer_are_unknown():
    assert "toy_linear" not in ddl("recipes").stdout
    result = ddl("show", str(PLUGIN / "ddl_toy" / "recipes" / "toy_linear.yaml"))
    assert result.returncode == 2 and "unknown trainer" in result.stderr, result.stderr


@pytest.mark.distributed
def test_a_plugin_trainer_trains_on_two_workers_and_predicts(plugin_site, tmp_path):
    result = ddl("train", "toy_linear", f"run.dir={tmp_path / 'run'}", "-np", "2", python_path=(plugin_site,))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["workers"] == 2 and len(set(summary["weights_sha256_by_rank"])) == 1
    assert summary["results"]["model (valid)"]["mse"] < 0.01  # the noise is 1e-4; a model that did not learn: ~4
    predicted = ddl("predict", str(tmp_path / "run"), "1,0,0,0", "0,0,0,0", python_path=(plugin_site,))
    assert predicted.returncode == 0, predicted.stderr
    assert [line.split("\t")[0] for line in predicted.stdout.splitlines()] == ["1,0,0,0", "0,0,0,0"]


def test_a_plugin_that_fails_to_load_is_named(plugin_site, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(plugin_site, broken)
    (broken / "ddl_toy" / "__init__.py").write_text("raise ImportError('needs a package that is missing')\n")
    result = ddl("show", str(broken / "ddl_toy" / "recipes" / "toy_linear.yaml"), python_path=(broken,))
    assert result.returncode == 2, result.stderr
    assert "trainer 'toy' (ddl_toy:TRAINER) failed to load: ImportError: needs a package that is missing" in \
        result.stderr


BAD_TRAINER = '''
from pathlib import Path

from ddl_apps.core.contract import TorchTask, TrainerHooks


class Task(TorchTask):  # no loss, no splits
    def build_model(self): ...
    def predict(self, model, batch): ...
    def metrics(self, outputs): ...
    def export(self, model, model_dir: Path) -> None: ...


def build_task(recipe, topology) -> Task:
    return Task()


def predict(run_dir: Path, inputs: str) -> None: ...


HOOKS = TrainerHooks(build_task=build_task, predict=predict)
'''


def test_the_type_checker_finds_what_a_trainer_breaks_of_the_contract(tmp_path):
    (tmp_path / "bad_trainer.py").write_text(BAD_TRAINER)
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(Path(__file__).parent.parent /
                             "mypy.ini"), str(tmp_path / "bad_trainer.py")], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 1, result.stdout
    assert 'Cannot instantiate abstract class "Task" with abstract attributes "loss", "test", "train" and "valid"' \
        in result.stdout
    assert 'Argument "predict" to "TrainerHooks" has incompatible type' in result.stdout
