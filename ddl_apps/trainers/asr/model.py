"""Conformer-CTC: a convolutional 4x time subsampling, torchaudio's Conformer encoder, and a linear CTC head."""

from __future__ import annotations

import torch
from torch import nn
from torchaudio.models import Conformer


def subsampled(lengths: torch.Tensor) -> torch.Tensor:
    """Frames left after two stride-2 convolutions (kernel 3, padding 1)."""
    for _ in range(2):
        lengths = (lengths - 1) // 2 + 1
    return lengths


class ConformerCTC(nn.Module):
    """torchaudio's Conformer masks padding in attention but not in its depthwise convolutions, so padded frames
    leaked into the last real ones and an utterance decoded differently alone than in a padded batch. Padded
    frames are zeroed in front of every depthwise convolution: each utterance gets what it gets alone."""

    def __init__(self, n_mels: int, vocab_size: int, d_model: int, layers: int, heads: int, ffn_multiplier: int,
                 conv_kernel: int, dropout: float, subsample_channels: int):
        super().__init__()
        self.subsample = nn.Sequential(
            nn.Conv2d(1, subsample_channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(subsample_channels, subsample_channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.project = nn.Linear(subsample_channels * ((n_mels + 3) // 4), d_model)
        self.encoder = Conformer(input_dim=d_model, num_heads=heads, ffn_dim=ffn_multiplier * d_model,
                                 num_layers=layers, depthwise_conv_kernel_size=conv_kernel, dropout=dropout)
        self.head = nn.Linear(d_model, vocab_size)
        self._real_frames: torch.Tensor | None = None  # (batch, 1, frames): 1 for real frames, 0 for padding
        for module in self.encoder.modules():
            if isinstance(module, nn.Conv1d) and module.groups > 1:
                module.register_forward_pre_hook(self._zero_padding)

    def _zero_padding(self, module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        assert self._real_frames is not None, "forward sets the mask before the encoder runs"
        return (args[0] * self._real_frames,)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, frames, n_mels) -> CTC log-probabilities (batch, frames / 4, vocab) and their lengths."""
        x = self.subsample(features.unsqueeze(1))  # (batch, channels, frames/4, mels/4)
        x = self.project(x.permute(0, 2, 1, 3).flatten(2))
        lengths = subsampled(lengths).clamp(max=x.shape[1])
        real = torch.arange(x.shape[1], device=x.device) < lengths[:, None]  # (batch, frames)
        self._real_frames = real.unsqueeze(1).to(x.dtype)
        # torchaudio's Conformer.forward, with the padding mask from the count of frames: its own reads the longest
        # length as a Python number, which torch.export cannot follow into a graph of any length
        x = x.transpose(0, 1)
        for layer in self.encoder.conformer_layers:
            x = layer(x, ~real)
        return self.head(x.transpose(0, 1)).log_softmax(-1), lengths


class FeatureTranscriber(nn.Module):
    """The model on utterances of one length, as MLflow's pytorch flavour serves a model of one input: log-mel
    features (data.LogMel's) [batch, frames, mels] -> CTC log-probabilities [batch, frames / 4, vocab]."""

    def __init__(self, model: ConformerCTC):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        frames = features.shape[1] + torch.zeros(features.shape[0], dtype=torch.long)
        return self.model(features, frames)[0]


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int = 0) -> list[list[int]]:
    """Best path: the most likely token per frame, repeats merged, blanks dropped."""
    best = log_probs.argmax(-1)
    decoded = []
    for row, length in zip(best, lengths, strict=True):
        tokens = torch.unique_consecutive(row[: int(length)]).tolist()
        decoded.append([t for t in tokens if t != blank])
    return decoded
