"""Speech recognition: torchaudio features and a Conformer-CTC acoustic model on the PyTorch engine."""

from ddl_apps.core.contract import Trainer
from ddl_apps.trainers.asr.config import DataConfig, ModelConfig

TRAINER = Trainer(name="asr", engine="torch", data_config=DataConfig, model_config=ModelConfig,
                  hooks="ddl_apps.trainers.asr.trainer:HOOKS")
