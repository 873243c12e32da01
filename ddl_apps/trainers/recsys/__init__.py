"""Recommendation: NeuMF on implicit feedback, with embedding tables sharded across workers."""

from ddl_apps.core.contract import Trainer
from ddl_apps.trainers.recsys.config import DataConfig, ModelConfig

TRAINER = Trainer(name="recsys", engine="torch", data_config=DataConfig, model_config=ModelConfig,
                  hooks="ddl_apps.trainers.recsys.trainer:HOOKS")
