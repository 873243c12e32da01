"""A small probe trainer for the engine tests: scikit-learn's handwritten digits, a deterministic MLP."""

from pydantic import Field

from ddl_apps.recipe import Section


class DataConfig(Section):
    train_examples: int = Field(1536, gt=0)
    nan_examples: list[int] = Field([], description="training examples whose pixels are made NaN")
    stream: bool = Field(False, description="serve the training split as a StreamSource instead of by index")


class ModelConfig(Section):
    hidden: int = 32
    failing_artifacts: bool = Field(False, description="writing the run's artifacts raises (a failing baseline)")
