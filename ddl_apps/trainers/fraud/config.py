"""The fraud recipe's `data` and `model` sections."""

from typing import Literal

from pydantic import Field, model_validator

from ddl_apps.data.config import PreparedData
from ddl_apps.recipe import Section

IEEE_CIS = "ieee-cis"


class DataConfig(PreparedData):
    source: str = Field(IEEE_CIS, description=f"'{IEEE_CIS}' (the shipped IEEE-CIS table) or a CSV/Parquet path")
    label: str = "isFraud"
    time_column: str | None = Field("TransactionDT", description="split by time when set, else at random")
    id_column: str | None = Field("TransactionID", description="kept beside the scores by 'ddl predict'")
    categorical: list[str] = Field(default_factory=list, description="columns embedded as categories")
    numeric: list[str] | None = Field(None, description="numeric columns; default: every other column")
    rows: int | None = Field(None, gt=0, description="use a random sample of this many rows")
    valid_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    max_categories: int = Field(5000, ge=1, description="most frequent values kept per column; rest -> unknown")
    min_category_count: int = Field(5, ge=1, description="rarer values map to the unknown bucket")

    @model_validator(mode="after")
    def _no_overlap(self):
        named = [self.label, *self.categorical, *(self.numeric or [])]
        repeated = sorted({c for c in named if named.count(c) > 1})
        if repeated:
            raise ValueError(f"columns named more than once (label, categorical, numeric): {repeated}")
        return self


class ModelConfig(Section):
    hidden: list[int] = Field(default_factory=lambda: [256, 128], description="MLP layer widths")
    embedding_dim: int = Field(16, ge=1, description="largest embedding width (smaller for few categories)")
    dropout: float = Field(0.1, ge=0, lt=1)
    loss: Literal["weighted_bce", "focal"] = "weighted_bce"
    pos_weight: float | None = Field(None, gt=0, description="weight of fraud examples; default sqrt(neg/pos)")
    focal_gamma: float = Field(2.0, ge=0)
    baseline: bool = Field(True, description="train a HistGradientBoostingClassifier on the same split")
    baseline_rows: int = Field(2_000_000, gt=0, description="training rows the baseline reads at most (a random "
                               "sample: the prepared training split is shuffled)")
