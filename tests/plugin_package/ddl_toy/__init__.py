"""A toy regression trainer (y = x . w + noise, a linear model) written against the trainer contract."""

from pathlib import Path

from pydantic import Field

from ddl_apps.core.contract import Trainer
from ddl_apps.recipe import Section


class DataConfig(Section):
    examples: int = Field(512, gt=0)
    features: int = Field(4, gt=0)


class ModelConfig(Section):
    bias: bool = True


TRAINER = Trainer(name="toy", engine="torch", data_config=DataConfig, model_config=ModelConfig,
                  hooks="ddl_toy.hooks:HOOKS", recipes=Path(__file__).parent / "recipes")
