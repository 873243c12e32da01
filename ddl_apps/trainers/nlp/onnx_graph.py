"""The text classifier as an ONNX graph: token ids and attention mask [batch, sequence] -> every label's probability
[batch, labels], as `ddl predict` prints them. The tokenizer (the text of its tokenizer.json, which the `tokenizers`
package reads without transformers), the truncation length and the label names are in the file's metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ddl_apps.trainers import onnx_export

EXAMPLE_TEXTS = ["A film.", "Sharp, funny and far too long for what it has to say about anyone in it."]


class Probabilities(nn.Module):
    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(input_ids=input_ids, attention_mask=attention_mask).logits.float().softmax(-1)


def export(classifier: Any, tokenizer: Any, output: Path) -> float:
    """The ONNX file of `ddl export`; the largest absolute difference from the framework on example texts."""
    encoded = tokenizer(EXAMPLE_TEXTS, truncation=True, padding=True, return_token_type_ids=False, return_tensors="np")
    example = {name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
    config = classifier.config
    metadata = {"labels": [config.id2label[i] for i in range(config.num_labels)],
                "tokenizer": json.loads(tokenizer.backend_tokenizer.to_str()), "max_length": tokenizer.model_max_length,
                "pad_token": tokenizer.pad_token, "pad_id": tokenizer.pad_token_id}
    tokens = {0: "batch", 1: "sequence"}
    return onnx_export.write_torch_onnx(output, Probabilities(classifier), example, ["probabilities"],
                                        {"input_ids": tokens, "attention_mask": tokens, "probabilities": {0: "batch"}},
                                        metadata)
