"""The digits probe trainer on the Keras engine."""

from ddl_apps.core.contract import Trainer
from tests.probe_keras.config import DataConfig, ModelConfig

TRAINER = Trainer(name="tests.probe_keras", engine="keras", data_config=DataConfig, model_config=ModelConfig,
                  hooks="tests.probe_keras.trainer:HOOKS")
