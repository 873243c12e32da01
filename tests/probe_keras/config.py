"""The Keras probe trainer for the engine tests: the same digits and MLP as tests/probe, in Keras 3."""

from pydantic import Field

from ddl_apps.recipe import Section


class DataConfig(Section):
    train_examples: int = Field(1536, gt=0)


class ModelConfig(Section):
    hidden: int = 32
