"""Fraud detection on card transactions: tabular MLP with categorical embeddings (PyTorch + scikit-learn)."""

from ddl_apps.core.contract import Trainer
from ddl_apps.trainers.tabular.config import DataConfig, ModelConfig

TRAINER = Trainer(name="tabular", engine="torch", data_config=DataConfig, model_config=ModelConfig,
                  hooks="ddl_apps.trainers.tabular.trainer:HOOKS")
