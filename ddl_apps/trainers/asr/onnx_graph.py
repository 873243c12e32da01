"""The speech model as an ONNX graph from audio to CTC log-probabilities, the log-mel front end inside it:
`audio` float32 [batch, samples] (16 kHz mono, each utterance padded with zeros to the longest) and
`audio_lengths` int64 [batch] -> `log_probs` [batch, frames, vocabulary] and `lengths` [batch] (each utterance's
frames). Greedy CTC decoding and the alphabet (in the file's metadata) turn them into `ddl transcribe`'s text.

An utterance alone, or among utterances of its own length, gets exactly its features; in a batch with a longer one,
a shorter utterance's last two frames see the padding where its own analysis window would reflect its end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddl_apps.trainers import onnx_export
from ddl_apps.trainers.asr import data
from ddl_apps.trainers.asr.audio import MIN_SAMPLES
from ddl_apps.trainers.asr.model import ConformerCTC


class MelPower(nn.Module):
    """torchaudio's MelSpectrogram (data.LogMel's) as matrix products: centred, reflect-padded frames times the
    window's cosines and sines, squared, times the mel filters: (batch, samples) -> (batch, frames, mels).
    onnxruntime's DFT operator, which torch's STFT exports to, is many times slower at this 400-point size
    (docs/export.md)."""

    def __init__(self, n_mels: int):
        super().__init__()
        mel = data.LogMel(n_mels).mel
        self.n_fft, self.hop = mel.spectrogram.n_fft, mel.spectrogram.hop_length
        samples, bins = torch.arange(self.n_fft, dtype=torch.float64), torch.arange(self.n_fft // 2 + 1)
        angle = 2 * math.pi * torch.outer(samples, bins.double()) / self.n_fft
        window = mel.spectrogram.window.double()[:, None]
        self.cos, self.sin = (nn.Buffer((window * wave(angle)).float()) for wave in (torch.cos, torch.sin))
        self.filters = nn.Buffer(mel.mel_scale.fb)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        half = self.n_fft // 2
        frames = nn.functional.pad(audio[:, None], (half, half), mode="reflect")[:, 0].unfold(1, self.n_fft, self.hop)
        return ((frames @ self.cos) ** 2 + (frames @ self.sin) ** 2) @ self.filters


class TranscriptionGraph(nn.Module):
    """data.LogMel on each utterance of a padded batch (normalised over its own frames, padding zeroed as a padded
    training batch holds it), then the model."""

    def __init__(self, model: ConformerCTC, n_mels: int):
        super().__init__()
        self.model, self.mel = model, MelPower(n_mels)

    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.log(self.mel(audio) + 1e-6)  # (batch, frames, mels)
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
