"""Speech trainer: Conformer-CTC on log-mel features with SpecAugment and speed perturbation, on the PyTorch
engine; word and character error rates over whole splits; `ddl transcribe` for audio files."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio

from ddl_apps.core.contract import Preparer, TorchTask, TrackedModel, TrainerHooks
from ddl_apps.core.dist import Topology
from ddl_apps.core.rundir import MODEL_DIR, reading_export
from ddl_apps.core.torch_engine import Batch, load_weights, save_weights
from ddl_apps.data.dataset import task_splits
from ddl_apps.data.prepare import open_prepared, run_seed
from ddl_apps.recipe import Recipe
from ddl_apps.trainers import file_inputs
from ddl_apps.trainers.asr import data, onnx_graph, prepared
from ddl_apps.trainers.asr.audio import load_audio
from ddl_apps.trainers.asr.model import ConformerCTC, FeatureTranscriber, greedy_decode

ARCHITECTURE, TRANSCRIPTS = "model.json", "test_transcripts.jsonl"
MAX_CHARS = 512  # hypotheses travel between ranks as fixed-width token arrays


def edit_distance(reference, hypothesis) -> int:
    """Levenshtein distance between two sequences (substitutions, insertions, deletions)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def error_counts(reference: str, hypothesis: str) -> tuple[int, int, int, int]:
    """(word errors, reference words, character errors, reference characters) of one utterance."""
    return (edit_distance(reference.split(), hypothesis.split()), len(reference.split()),
            edit_distance(reference, hypothesis), len(reference))


def error_rates(counts: np.ndarray) -> dict[str, float]:
    """WER and CER of a whole split from per-utterance counts (rows of error_counts): errors / reference length."""
    word_errors, words, char_errors, chars = counts.sum(0)
    return {"wer": float(word_errors / max(words, 1)), "cer": float(char_errors / max(chars, 1))}


class SpecAugment(torch.nn.Module):
    """Frequency and time masks on a padded batch of features (batch, frames, mels), masked with zeros (the
    per-utterance mean after normalisation); masks drawn from torch's RNG."""

    def __init__(self, cfg: data.DataConfig):
        super().__init__()
        self.freq = [torchaudio.transforms.FrequencyMasking(cfg.freq_mask_width, iid_masks=True)] * cfg.freq_masks
        self.time = [torchaudio.transforms.TimeMasking(cfg.time_mask_width, iid_masks=True)] * cfg.time_masks

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.transpose(1, 2).unsqueeze(1)  # torchaudio's layout: (batch, channel, mels, frames)
        for mask in (*self.freq, *self.time):
            x = mask(x)
        return x.squeeze(1).transpose(1, 2)


class AsrTask(TorchTask):
    """`test_references()`: each test utterance's audio file and transcript, in the test split's order."""

    def __init__(self, recipe: Recipe, train: Any, valid: Any, test: Any,
                 test_references: Callable[[], tuple[Sequence[Any], Sequence[Any]]]):
        self.data_cfg, self.model_cfg = recipe.data, recipe.model
        self.train, self.valid, self.test, self.test_references = train, valid, test, test_references
        self.spec_augment = SpecAugment(self.data_cfg)

    def architecture(self) -> dict:
        return {"n_mels": self.data_cfg.n_mels, "vocab_size": data.VOCAB_SIZE, **self.model_cfg.model_dump()}

    def build_model(self) -> ConformerCTC:
        return ConformerCTC(**self.architecture())

    def loss(self, model: ConformerCTC, batch: Batch) -> torch.Tensor:
        log_probs, lengths = model(self.spec_augment(batch["features"]), batch["lengths"])
        return torch.nn.functional.ctc_loss(log_probs.transpose(0, 1), batch["targets"], lengths,
                                            batch["target_lengths"], blank=data.BLANK, zero_infinity=True)

    def predict(self, model: ConformerCTC, batch: Batch) -> dict[str, torch.Tensor]:
        log_probs, lengths = model(batch["features"], batch["lengths"])
        hypotheses = greedy_decode(log_probs, lengths, data.BLANK)
        counts, tokens = [], torch.zeros(len(hypotheses), MAX_CHARS, dtype=torch.uint8)
        for row, (hypothesis, target, length) in enumerate(zip(hypotheses, batch["targets"], batch["target_lengths"],
                                                               strict=True)):
            counts.append(error_counts(data.decode(target[:length].tolist()), data.decode(hypothesis)))
            tokens[row, : min(len(hypothesis), MAX_CHARS)] = torch.tensor(hypothesis[:MAX_CHARS], dtype=torch.uint8)
        return {"errors": torch.tensor(counts, dtype=torch.long).reshape(-1, 4), "hypothesis": tokens,
                "index": batch["index"]}

    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        return error_rates(outputs["errors"])

    def write_artifacts(self, run_dir: Path, outputs: dict[str, np.ndarray]) -> None:
        """Every test utterance's file, reference and hypothesis, as JSON lines."""
        files, texts = self.test_references()
        with (run_dir / TRANSCRIPTS).open("w") as f:
            for index, tokens in zip(outputs["index"], outputs["hypothesis"], strict=True):
                f.write(json.dumps({"audio_filepath": str(files[index]), "text": texts[index],
                                    "hypothesis": data.decode(tokens.tolist())}) + "\n")

    def export(self, model: ConformerCTC, model_dir: Path) -> None:
        save_weights(model, model_dir)
        (model_dir / ARCHITECTURE).write_text(json.dumps(self.architecture()))

    def tracked_model(self, model: ConformerCTC, batch: Batch) -> TrackedModel:
        """The first test utterances' log-mel features (padded to the longest) in, any number of frames."""
        return TrackedModel("pytorch", FeatureTranscriber(model).eval(), batch["features"].numpy(), variable_axes=(1,))

    def report(self) -> dict[str, dict[str, float]]:
        return {}


PREPARER = Preparer(source=prepared.source_identity, write=prepared.write_prepared, columns=prepared.COLUMNS,
                    depends_on=run_seed, read_at_training=prepared.READ_AT_TRAINING)


def build_task(recipe: Recipe, topology: Topology) -> AsrTask:
    """Every worker reading the manifests (each audio file decoded once to check it), or, with data.prepared,
    streaming a prepared dataset: training steps of utterances of similar duration, decoded as they are read."""
    cfg = recipe.data
    features = data.LogMel(cfg.n_mels)
    if cfg.prepared is None:
        splits = data.load_splits(data.corpus_folder(cfg), cfg)
        return AsrTask(recipe, data.Utterances(splits["train"], features, cfg.speed_factors),
                       data.Utterances(splits["valid"], features), data.Utterances(splits["test"], features),
                       lambda: (splits["test"].paths, splits["test"].texts))
    dataset = open_prepared(recipe, PREPARER)
    speeds = prepared.speeds(cfg.speed_factors, recipe.run.seed) if set(cfg.speed_factors) - {1.0} else None
    train, valid, test = task_splits(dataset, cfg, recipe.run.seed, functools.partial(prepared.to_batch,
                                     features=features), bucket_by="duration", augment=speeds)

    def test_references() -> tuple[Sequence[Any], Sequence[Any]]:
        rows = dataset.split("test").load(columns=["file", "text"])  # (not the audio)
        return rows["file"].tolist(), rows["text"].tolist()

    return AsrTask(recipe, train, valid, test, test_references)


def load_exported(model_dir: Path) -> tuple[ConformerCTC, int]:
    """The model a run exported, ready to transcribe, and its number of mel bins."""
    with reading_export(model_dir):
        architecture = json.loads((model_dir / ARCHITECTURE).read_text())
    model = ConformerCTC(**architecture)
    load_weights(model, model_dir)
    return model.eval(), architecture["n_mels"]


def transcribe(model_dir: Path, files: list[Path]) -> list[str]:
    """The transcript of each audio file, with the model a run exported."""
    model, n_mels = load_exported(model_dir)
    features = data.LogMel(n_mels)
    transcripts = []
    with torch.no_grad():
        for path in files:
            x = features(torch.from_numpy(load_audio(path)))[None]
            log_probs, lengths = model(x, torch.tensor([len(x[0])]))
            transcripts.append(data.decode(greedy_decode(log_probs, lengths, data.BLANK)[0]))
    return transcripts


def predict_cli(run_dir: Path, inputs: list[str], output: Path | None) -> None:
    """`ddl transcribe RUN_DIR file.wav ...`: file and transcript, one line each."""
    audio_files = file_inputs.existing_files(inputs, "audio")
    transcripts = transcribe(run_dir / MODEL_DIR, audio_files)
    rows = [[str(f), t] for f, t in zip(audio_files, transcripts, strict=True)]
    file_inputs.print_rows(["file", "transcript"], rows, output)


def export_onnx(model_dir: Path, output: Path) -> float:
    return onnx_graph.export(*load_exported(model_dir), output)


HOOKS = TrainerHooks(build_task=build_task, predict=predict_cli, prepare=PREPARER, export_onnx=export_onnx)
