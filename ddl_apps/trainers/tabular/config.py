"""The fraud recipe's `data` and `model` sections."""

from typing import Literal

from pydantic import Field, model_validator

from ddl_apps.data.config import PreparedData
from ddl_apps.recipe import Section

IEEE_CIS, TELCO_CHURN = "ieee-cis", "telco-churn"


class DataConfig(PreparedData):
    source: str = Field(description=f"a CSV/Parquet path, or a shipped table: '{IEEE_CIS}' (card transactions) "
                        f"or '{TELCO_CHURN}' (customer churn)")
    label: str = Field(description="the column to predict: two values (0/1, true/false, yes/no, or any two)")
    positive_label: str | int | bool | None = Field(
        None, description="the label value to predict (its probability is the score); needed when the two values "
        "are not 0/1, true/false or yes/no")
    time_column: str | None = Field(None, description="split by time when set (past: train; future: valid, test), "
                                    "else at random, stratified by the label")
    id_column: str | None = Field(None, description="kept beside the scores by 'ddl predict'")
    score_column: str = Field("probability", description="the name of the scores column 'ddl predict' writes")
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


class PeriodicConfig(Section):
    frequencies: int = Field(16, ge=1, description="trained frequencies per numeric feature")
    width: int = Field(8, ge=1, description="each numeric feature's embedding width")
    scale: float = Field(0.1, gt=0, description="standard deviation of the initial frequencies")


class ModelConfig(Section):
    hidden: list[int] = Field(default_factory=lambda: [256, 128], description="MLP layer widths")
    embedding_dim: int = Field(16, ge=1, description="largest embedding width (smaller for few categories)")
    dropout: float = Field(0.1, ge=0, lt=1)
    ensemble: int = Field(1, ge=1, description="TabM-mini members sharing the MLP (1: a single MLP)")
    periodic: PeriodicConfig | None = Field(None, description="periodic embeddings of the numeric features "
                                            "(none: the numbers enter the MLP as they are)")
    loss: Literal["bce", "weighted_bce", "focal"] = Field(
        "weighted_bce", description="bce keeps scores calibrated; weighted_bce and focal weigh the rare positives up")
    pos_weight: float | None = Field(None, gt=0, description="weight of positive examples in weighted_bce and focal; "
                                     "default sqrt(negatives/positives)")
    focal_gamma: float = Field(2.0, ge=0)
    baselines: list[Literal["gradient_boosting", "logistic"]] = Field(
        ["gradient_boosting", "logistic"],
        description="scikit-learn models trained on the same split and features after the run: "
        "HistGradientBoostingClassifier, LogisticRegression (on one-hot categories)")
    baseline_rows: int = Field(2_000_000, gt=0, description="training rows the baseline reads at most (a random "
                               "sample: the prepared training split is shuffled)")
