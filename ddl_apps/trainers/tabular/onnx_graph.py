"""The tabular model as one ONNX graph from raw columns to `ddl predict`'s score: the preprocessing (signed log,
median imputation, missing-value indicators, scaling, category lookup and counts) runs inside it.

Inputs: `numeric` float64 [batch, numeric columns] (missing values NaN) and `categories` string [batch, categorical
columns], each cell as the training data held it (a CSV's text; a value the training rows did not hold often enough,
or a missing one, counts as unknown); output `score` [batch], the probability of the positive label. The column
names, in order, are in the file's metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ddl_apps.trainers import onnx_export
from ddl_apps.trainers.tabular.data import Preprocessor
from ddl_apps.trainers.tabular.model import TabularModel

ML_DOMAIN = "ai.onnx.ml"


class ScoringGraph(nn.Module):
    """Preprocessor.transform's numeric steps in float64 (as numpy does them), then the model's probability."""

    def __init__(self, model: TabularModel, pre: Preprocessor):
        super().__init__()
        self.model = model
        self.medians, self.means, self.scales = (nn.Buffer(torch.tensor(v, dtype=torch.float64))
                                                 for v in (pre.medians, pre.means, pre.scales))
        self.indicators = nn.Buffer(torch.tensor([pre.numeric.index(c) for c in pre.indicator_columns],
                                                 dtype=torch.long))
        self.log_counts = nn.ParameterList(nn.Parameter(torch.from_numpy(table), requires_grad=False)
                                           for table in pre.log_count_tables())

    def forward(self, numeric: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        raw = torch.sign(numeric) * torch.log1p(numeric.abs())
        missing = torch.isnan(raw)
        scaled = (torch.where(missing, self.medians, raw) - self.means) / self.scales
        log_counts = [table[categories[:, j]][:, None] for j, table in enumerate(self.log_counts)]
        features = torch.cat([scaled, missing[:, self.indicators].double(), *log_counts], dim=1)
        features = torch.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0).float()
        return self.model.probability(features, categories)


def look_up_categories(path: Path, vocabularies: list[list[str]]) -> None:
    """The graph's int64 input `categories` (indices) made a string input: each column's value -> its index in
    that column's vocabulary (1-based; 0 for any other), by ONNX-ML LabelEncoder nodes in front of the network."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["category_index" if name == "categories" else name for name in node.input]
    [old] = [i for i in graph.input if i.name == "categories"]
    graph.input.remove(old)
    graph.input.append(helper.make_tensor_value_info("categories", TensorProto.STRING, ["batch", len(vocabularies)]))
    lookups = []
    for j, vocabulary in enumerate(vocabularies):
        column, index = f"category_{j}", f"category_{j}_index"
        lookups += [
            helper.make_node("Constant", [], [f"{column}_at"], value=helper.make_tensor(f"{column}_at",
                                                                                        TensorProto.INT64, [], [j])),
            helper.make_node("Gather", ["categories", f"{column}_at"], [column], axis=1),
            helper.make_node("LabelEncoder", [column], [f"{index}_flat"], domain=ML_DOMAIN, keys_strings=vocabulary,
                             values_int64s=list(range(1, len(vocabulary) + 1)), default_int64=0),
            helper.make_node("Constant", [], [f"{index}_axes"], value=helper.make_tensor(f"{index}_axes",
                                                                                         TensorProto.INT64, [1], [1])),
            helper.make_node("Unsqueeze", [f"{index}_flat", f"{index}_axes"], [index]),
        ]
    lookups.append(helper.make_node("Concat", [f"category_{j}_index" for j in range(len(vocabularies))],
                                    ["category_index"], axis=1) if vocabularies else
                   helper.make_node("Cast", ["categories"], ["category_index"], to=TensorProto.INT64))  # ([batch, 0])
    nodes = [*lookups, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    model.opset_import.append(helper.make_opsetid(ML_DOMAIN, 3))
    onnx.save(model, str(path))


def example_rows(pre: Preprocessor, rows: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Raw rows around the training distribution (the first with every number missing and unknown categories)."""
    rng = np.random.default_rng(seed)
    logs = np.asarray(pre.means) + np.asarray(pre.scales) * rng.standard_normal((rows, len(pre.numeric)))
    numeric = np.sign(logs) * np.expm1(np.abs(logs))  # (signed_log's inverse)
    numeric[0] = np.nan
    vocabularies = list(pre.vocabularies.values())
    categories = np.array([[v[(i * 7 + j) % len(v)] if i and v else "?" for j, v in enumerate(vocabularies)]
                           for i in range(rows)], dtype=object).reshape(rows, len(vocabularies))
    return {"numeric": numeric, "categories": categories}


BATCH = {0: "batch"}


def export(model: TabularModel, pre: Preprocessor, columns: dict, output: Path) -> float:
    """The ONNX file of `ddl export`; the largest absolute difference from the framework on example rows."""
    rows = example_rows(pre)

    def strings_in_front(path: Path, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        look_up_categories(path, list(pre.vocabularies.values()))
        return {**example, "categories": rows["categories"]}

    metadata = {"numeric_columns": pre.numeric, "categorical_columns": list(pre.vocabularies),
                "score_column": columns["score"], "id_column": columns["id"] or ""}
    indices = pre.category_indices(pd.DataFrame(rows["categories"], columns=list(pre.vocabularies)))
    example = {"numeric": rows["numeric"], "categories": indices}
    return onnx_export.write_torch_onnx(output, ScoringGraph(model, pre), example, ["score"],
                                        {"numeric": BATCH, "categories": BATCH, "score": BATCH}, metadata,
                                        edit=strings_in_front)
