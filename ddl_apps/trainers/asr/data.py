"""Manifests, text, features and batches for the speech trainer.

A manifest is JSON lines with `audio_filepath` (absolute, or relative to the manifest's folder) and `text`
(other fields, such as `duration`, are ignored), the format NeMo and other ASR toolkits use, so LibriSpeech- or
Common-Voice-style manifests work as they are. Every file is decoded once before training starts (which measures
its duration), so a broken one stops the run before it writes anything; then audio is read lazily, batch by
batch, so corpora larger than memory train too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio

from ddl_apps.cache import build_once, cache_dir
from ddl_apps.errors import DataError
from ddl_apps.trainers.asr import corpus
from ddl_apps.trainers.asr.audio import SAMPLE_RATE, load_audio, read_samples
from ddl_apps.trainers.asr.config import ASR_COMMANDS, DataConfig

BLANK = 0
ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"  # token i + 1; 0 is the CTC blank
VOCAB_SIZE = len(ALPHABET) + 1
HOP = SAMPLE_RATE // 100  # 10 ms frames


def normalise(text: str) -> str:
    """Lower case, letters, apostrophes and single spaces: the transcripts the model learns and is scored on."""
    text = re.sub(r"[^a-z' ]+", " ", text.lower().replace("-", " "))
    return " ".join(text.split())


def encode(text: str) -> list[int]:
    return [ALPHABET.index(c) + 1 for c in text]


def decode(tokens) -> str:
    return "".join(ALPHABET[t - 1] for t in tokens if t != BLANK)


@dataclass
class Manifest:
    paths: list[Path]
    texts: list[str]
    durations: np.ndarray


def read_manifest(path: Path, limit: int | None = None) -> Manifest:
    """Read and check a manifest: every line parses, names a readable audio file, and has a text."""
    paths, texts = manifest_entries(path, limit)
    return Manifest(paths, texts, np.asarray([seconds(audio) for audio in paths], dtype=np.float64))


def manifest_entries(path: Path, limit: int | None = None) -> tuple[list[Path], list[str]]:
    """A manifest's audio files (each there) and normalised transcripts, every line checked; no audio is read."""
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    paths, texts = [], []
    for number, line in enumerate(manifest_lines(path), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            audio, text = Path(entry["audio_filepath"]), entry["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}, line {number}: not a manifest entry ({e!r}); each line must be a JSON object "
                            'with "audio_filepath" and "text"') from None
        if not isinstance(text, str):
            raise DataError(f'{path}, line {number}: "text" must be the transcript as a string, not '
                            f"{type(text).__name__}")
        paths.append(audio if audio.is_absolute() else path.parent / audio)
        texts.append(normalise(text))
        if limit and len(paths) == limit:
            break
    if not paths:
        raise DataError(f"manifest {path} lists no utterances")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} audio file(s) missing, e.g. {', '.join(missing[:3])}")
    return paths, texts


def manifest_lines(path: Path) -> list[str]:
    """Lines split at newlines only: a JSON string may hold U+2028 and the like, where str.splitlines splits too."""
    try:
        return path.read_text().split("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"manifest {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def seconds(audio: Path) -> float:
    """The duration of an audio file, decoding all of it: a corrupt or empty file fails here, before training."""
    samples, rate = read_samples(audio)
    return len(samples) / rate


def corpus_folder(cfg: DataConfig) -> Path:
    """The folder holding the manifests: the user's, or the generated command corpus (made on first use)."""
    if cfg.source != ASR_COMMANDS:
        folder = Path(cfg.source)
        if not folder.is_dir():
            raise DataError(f"data.source: {folder} is not a folder with train.jsonl, valid.jsonl and test.jsonl")
        return folder
    folder = cache_dir("datasets") / (f"asr-commands-seed{cfg.corpus_seed}-{cfg.train_utterances}-"
                                      f"{cfg.eval_utterances}")
    counts = {"train": cfg.train_utterances, "valid": cfg.eval_utterances, "test": cfg.eval_utterances}
    return build_once(folder, lambda: corpus.generate(folder, counts, cfg.corpus_seed))


class LogMel(torch.nn.Module):
    """Log-mel spectrogram, normalised per utterance and mel bin: (samples,) -> (frames, n_mels)."""

    def __init__(self, n_mels: int):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=400, hop_length=HOP, n_mels=n_mels)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        features = torch.log(self.mel(audio) + 1e-6).T
        return (features - features.mean(0)) / (features.std(0) + 1e-5)


class Utterances:
    """A split as a batch source: padded log-mel features and CTC targets for given indices.

    `lengths` (durations) lets the engine bucket batches by length. With speed factors (training), each
    utterance is played at one of them, drawn from torch's RNG (so a resumed run draws the same)."""

    def __init__(self, manifest: Manifest, features: LogMel, speed_factors: list[float] | None = None):
        self.manifest, self.features = manifest, features
        self.speed_factors = speed_factors if speed_factors and speed_factors != [1.0] else None
        self.lengths = manifest.durations

    def __len__(self) -> int:
        return len(self.manifest.paths)

    def _features(self, index: int) -> torch.Tensor:
        factor = 1.0
        if self.speed_factors:
            factor = self.speed_factors[int(torch.randint(len(self.speed_factors), ()))]
        return utterance_features(self.manifest.paths[index], None, factor, self.features)

    def take(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return padded_batch([self._features(int(i)) for i in indices], [self.manifest.texts[int(i)] for i in indices],
                            indices)


def utterance_features(path: Path | str, encoded: bytes | None, speed: float, features: LogMel) -> torch.Tensor:
    """An audio file's (or its bytes') log-mel features, played at `speed`."""
    audio = torch.from_numpy(load_audio(Path(path), encoded))
    if speed != 1.0:
        audio = torchaudio.functional.speed(audio[None], SAMPLE_RATE, speed)[0][0]
    return features(audio)


def padded_batch(features: list[torch.Tensor], texts: list[str], indices: np.ndarray) -> dict[str, torch.Tensor]:
    """Utterances' features and transcripts as a batch: padded, with their lengths and their indices."""
    targets = [torch.tensor(encode(text), dtype=torch.long) for text in texts]
    return {
        "features": torch.nn.utils.rnn.pad_sequence(features, batch_first=True),
        "lengths": torch.tensor([len(f) for f in features]),
        "targets": torch.nn.utils.rnn.pad_sequence(targets, batch_first=True) if targets else torch.zeros(0, 0),
        "target_lengths": torch.tensor([len(t) for t in targets]),
        "index": torch.as_tensor(np.asarray(indices, dtype=np.int64)),
    }


def load_splits(folder: Path, cfg: DataConfig) -> dict[str, Manifest]:
    """The manifests in the folder corpus_folder gave, long training utterances left out."""
    splits = {split: read_manifest(folder / name, cfg.limit) for split, name in corpus.MANIFESTS.items()}
    train = splits["train"]
    keep = train.durations <= cfg.max_duration
    if not keep.any():
        raise DataError(f"no training utterance is shorter than data.max_duration={cfg.max_duration} s")
    splits["train"] = Manifest([p for p, k in zip(train.paths, keep, strict=True) if k],
                               [t for t, k in zip(train.texts, keep, strict=True) if k], train.durations[keep])
    return splits
