"""The speech model as an ONNX graph from audio to CTC log-probabilities, the log-mel front end inside it:
`audio` float32 [batch, samples] (16 kHz mono, each utterance padded with zeros to the longest) and
`audio_lengths` int64 [batch] -> `log_probs` [batch, frames, vocabulary] and `lengths` [batch] (each utterance's
frames). Greedy CTC decoding and the alphabet (in the file's metadata) turn them into `ddl transcribe`'s text.

An utterance alone, or among utterances of its own length, gets exactly its features; padded behind a shorter one,
the last two frames of the shorter one see zeros where its own analysis window reflects its end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddl_apps.trainers import onnx_export
from ddl_apps.trainers.asr import data
from ddl_apps.trainers.asr.audio import MIN_SAMPLES
from ddl_apps.trainers.asr.model import ConformerCTC


class TranscriptionGraph(nn.Module):
    """data.LogMel on each utterance of a padded batch (normalised over its own frames, padding zeroed as a padded
    training batch holds it), then the model."""

    def __init__(self, model: ConformerCTC, n_mels: int):
        super().__init__()
        self.model, self.mel = model, data.LogMel(n_mels).mel

    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.log(self.mel(audio) + 1e-6).transpose(1, 2)  # (batch, frames, mels)
        frames = audio_lengths // data.HOP + 1  # (frames centred every HOP samples)
        real = (torch.arange(features.shape[1]) < frames[:, None]).unsqueeze(-1).to(features.dtype)
        count = frames[:, None].to(features.dtype)
        mean = (features * real).sum(1) / count
        std = ((((features - mean[:, None]) * real) ** 2).sum(1) / (count - 1)).sqrt()  # (torch.std's n - 1)
        normalised = (features - mean[:, None]) / (std[:, None] + 1e-5) * real
        return self.model(normalised, frames)


def export(model: ConformerCTC, n_mels: int, output: Path) -> float:
    """The ONNX file of `ddl export`; the largest absolute difference from the framework on example audio (two
    utterances of one second of noise-like sound, so that the check needs no data)."""
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal((2, data.SAMPLE_RATE))).astype(np.float32)
    example: dict[str, np.ndarray] = {"audio": audio, "audio_lengths": np.full(2, data.SAMPLE_RATE, dtype=np.int64)}
    metadata = {"alphabet": data.ALPHABET, "blank": data.BLANK, "sample_rate": data.SAMPLE_RATE}
    return onnx_export.write_torch_onnx(output, TranscriptionGraph(model, n_mels), example, ["log_probs", "lengths"],
                                        {"audio": {0: "batch", 1: "samples"}, "audio_lengths": {0: "batch"}},
                                        metadata, smallest={"samples": MIN_SAMPLES})
