"""The digits probe trainer (PyTorch engine) for the engine tests."""

from ddl_apps.core.contract import Trainer
from tests.probe.config import DataConfig, ModelConfig

TRAINER = Trainer(name="tests.probe", engine="torch", data_config=DataConfig, model_config=ModelConfig,
                  hooks="tests.probe.trainer:HOOKS")
