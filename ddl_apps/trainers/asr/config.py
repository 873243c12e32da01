"""The speech recipe's `data` and `model` sections."""

from pydantic import Field

from ddl_apps.data.config import OptionalPreparedData
from ddl_apps.recipe import Section

ASR_COMMANDS = "asr-commands"


class DataConfig(OptionalPreparedData):
    source: str = Field(ASR_COMMANDS, description=f"'{ASR_COMMANDS}' (the synthesised spoken-command corpus, "
                                                  "generated once into the cache) or a folder with train.jsonl, "
                                                  "valid.jsonl and test.jsonl manifests")
    train_utterances: int = Field(8000, gt=0, description=f"size of the generated '{ASR_COMMANDS}' corpus")
    eval_utterances: int = Field(800, gt=0, description="... and of each of its valid and test splits")
    corpus_seed: int = 0
    limit: int | None = Field(None, gt=0, description="use only the first N utterances of each split")
    max_duration: float = Field(20.0, gt=0, description="seconds; longer training utterances are left out")
    n_mels: int = Field(80, ge=16)
    speed_factors: list[float] = Field(default_factory=lambda: [0.9, 1.0, 1.1],
                                       description="speed perturbation: each training utterance at one of these")
    freq_masks: int = Field(2, ge=0, description="SpecAugment: frequency masks per utterance")
    freq_mask_width: int = Field(15, ge=0)
    time_masks: int = Field(2, ge=0, description="SpecAugment: time masks per utterance")
    time_mask_width: int = Field(10, ge=0, description="frames (10 ms each)")


class ModelConfig(Section):
    d_model: int = Field(144, ge=16, description="width of the Conformer")
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    ffn_multiplier: int = Field(2, ge=1)
    conv_kernel: int = Field(15, ge=3, description="depthwise convolution kernel (odd)")
    dropout: float = Field(0.0, ge=0, lt=1, description="SpecAugment, speed and noise regularise enough; "
                                                           "dropout cost a quarter of the step on CPU")
    subsample_channels: int = Field(32, ge=1, description="channels of the two stride-2 convolutions in front "
                                                          "(their cost grows with the square of this)")
