"""Image recognition: a small Keras 3 ResNet trained on the shared Horovod core's Keras engine."""

from ddl_apps.core.contract import Trainer
from ddl_apps.trainers.image.config import DataConfig, ModelConfig

TRAINER = Trainer(name="image", engine="keras", data_config=DataConfig, model_config=ModelConfig,
                  hooks="ddl_apps.trainers.image.trainer:HOOKS")
