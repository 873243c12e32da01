"""Text classification: fine-tuning a pretrained transformer (MiniLM-L6 by default) on the PyTorch engine."""

from ddl_apps.core.contract import Trainer
from ddl_apps.trainers.nlp.config import DataConfig, ModelConfig

TRAINER = Trainer(name="nlp", engine="torch", data_config=DataConfig, model_config=ModelConfig,
                  hooks="ddl_apps.trainers.nlp.trainer:HOOKS")
