"""Issue 23: the speech recipe from prepared shards of encoded audio: every bad file named while preparing; streamed
training (np=1 resumed, np=2, read into memory) with the same weights; durations in the shards bucket the steps;
`ddl transcribe` agrees with the evaluation of a run trained from shards."""

import json

import numpy as np
import pytest
import soundfile as sf

from ddl_apps.data.dataset import PreparedDataset
from ddl_apps.trainers.asr.trainer import error_counts, error_rates
from tests.engine_runs import ddl, final_weights, summary, train, trained
from tests.trainers.asr.test_asr import RECIPE, SMALL_MODEL, small_corpus  # noqa: F401 (a fixture)

RUN = (*SMALL_MODEL, "optim.epochs=2")  # default augmentation: speed perturbation and SpecAugment
AS_TWO_WORKERS = ("dist.batch_workers=2",)


def absolute_manifests(corpus, folder):
    """The corpus's manifests in `folder`, naming its audio files by absolute path."""
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"{split}.jsonl").write_text((corpus / f"{split}.jsonl").read_text().replace(
            '"audio/', f'"{corpus}/audio/'))


def test_prepare_names_every_bad_audio_file_and_writes_nothing(small_corpus, tmp_path):  # noqa: F811
    folder = tmp_path / "bad"
    absolute_manifests(small_corpus, folder)
    good = (small_corpus / "audio" / "train" / "00000.wav").read_bytes()
    (folder / "empty.wav").write_bytes(b"")
    (folder / "corrupt.flac").write_bytes(b"fLaC not really audio")
    (folder / "cut.wav").write_bytes(good[:60])  # the header and a few samples: under 50 ms
    sf.write(folder / "nan.wav", np.full(8000, np.nan, np.float32), 16_000, subtype="FLOAT")
    with (folder / "train.jsonl").open("a") as f:
        for name in ("empty.wav", "corrupt.flac", "cut.wav"):
            f.write(json.dumps({"audio_filepath": name, "text": "stop"}) + "\n")
    with (folder / "test.jsonl").open("a") as f:
        f.write(json.dumps({"audio_filepath": "nan.wav", "text": "go"}) + "\n")
    out = tmp_path / "prepared"
    result = ddl("data", "prepare", RECIPE, f"data.source={folder}", "-o", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "4 audio file(s) cannot be used" in result.stderr, result.stderr
    for name, why in [("empty.wav", "shorter than 50 ms"), ("corrupt.flac", "cannot read audio file"),
                      ("cut.wav", "shorter than 50 ms"), ("nan.wav", "NaN")]:
        assert name in result.stderr and why in result.stderr, (name, result.stderr)
    assert not out.exists()


@pytest.fixture(scope="module")
def shards(small_corpus, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("asr-prepared") / "prepared"
    result = ddl("data", "prepare", RECIPE, f"data.source={small_corpus}", "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_shards_hold_the_encoded_files_with_transcripts_and_durations(small_corpus, shards):  # noqa: F811
    dataset = PreparedDataset(str(shards))
    test = dataset.split("test").load()
    manifest = [json.loads(line) for line in (small_corpus / "test.jsonl").read_text().splitlines()]
    assert test["text"].tolist() == [line["text"] for line in manifest]
    assert [bytes(audio) for audio in test["audio"]] == [(small_corpus / line["audio_filepath"]).read_bytes()
                                                         for line in manifest]  # the files as they are
    np.testing.assert_allclose(test["duration"], [line["duration"] for line in manifest], atol=1e-3)
    assert dataset.manifest.rows("train") == 160


# Slow because it must: five launches (stopped, resumed, in memory, two workers, transcribe) compared.
@pytest.mark.distributed
def test_streamed_speech_trains_alike_on_one_and_two_workers_and_in_memory(small_corpus, shards,  # noqa: F811
                                                                          tmp_path, monkeypatch):
    """One worker streaming the shards (stopped mid-epoch, resumed) and one holding them in memory end with the
    same weights; two workers streaming with the same trained weights (BatchNorm's running statistics aside);
    `ddl transcribe` on the test files prints what the evaluation recorded."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same arithmetic as each of two workers on one core
    run = (*RUN, f"data.source={small_corpus}")
    alone = train(tmp_path / "alone", *run, *AS_TWO_WORKERS, f"data.prepared={shards}", "run.max_steps=7",
                  recipe=RECIPE)
    train(alone, *run, *AS_TWO_WORKERS, f"data.prepared={shards}", recipe=RECIPE, flags=("--resume",))
    in_memory = train(tmp_path / "memory", *run, *AS_TWO_WORKERS, f"data.prepared={shards}", "data.stream=false",
                      recipe=RECIPE)
    np.testing.assert_allclose(final_weights(in_memory), final_weights(alone), rtol=0, atol=1e-6)
    two = train(tmp_path / "two", *run, f"data.prepared={shards}", np=2, recipe=RECIPE)
    assert summary(two)["steps"] == summary(alone)["steps"] == 20
    np.testing.assert_allclose(final_weights(two, trained), final_weights(alone, trained), rtol=0, atol=1e-5)

    lines = [json.loads(line) for line in (alone / "test_transcripts.jsonl").read_text().splitlines()]
    assert len(lines) == 24
    printed = ddl("transcribe", str(alone), *(line["audio_filepath"] for line in lines))
    assert printed.returncode == 0, printed.stderr
    transcribed = [row.split("\t", 1)[1] for row in printed.stdout.splitlines()]
    counts = np.array([error_counts(line["hypothesis"], t) for t, line in zip(transcribed, lines, strict=True)])
    assert error_rates(counts)["cer"] < 0.05, transcribed
