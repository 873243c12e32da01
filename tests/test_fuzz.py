"""Issue 11: bad input, property-based. The recipe loader and every trainer's data reader, fed malformed, empty,
corrupt and mistyped input, either succeed with usable data or raise one UserError with a message, never another
exception; and bad input through `ddl train` exits with code 2, one message, no traceback and no run directory.

In CI the examples are the same every run (derandomized); DDL_FUZZ=N draws N times as many, afresh each run."""

import io
import json
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ddl_apps.core.dist import Topology
from ddl_apps.errors import RecipeError, UserError
from ddl_apps.recipe import DistConfig, OptimConfig, Recipe, RunConfig, load_recipe
from ddl_apps.registry import find_trainer, registered
from tests.engine_runs import PROBE, ddl

DEPTH = int(os.environ.get("DDL_FUZZ", "0"))


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples * max(1, DEPTH), deadline=None, derandomize=not DEPTH, database=None)


def accepted_or_explained(call: Callable, *args: Any) -> Any:
    """call(*args): its result, or None when it raised a UserError with a message; any other exception fails.
    (`pytest --hypothesis-show-statistics` shows how often each happened.)"""
    try:
        result = call(*args)
    except UserError as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        event(type(e).__name__)
        return None
    event("accepted")
    return result


def write(folder: Path, name: str, content: bytes | str) -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# ---- what bad input is made of --------------------------------------------------------------------------------
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                             max_size=3), max_leaves=8)
CELLS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=8)
COLUMN_CELLS = st.sampled_from([st.integers(-10**6, 10**6), st.floats(), st.text(max_size=8), CELLS])


def trainer_sections(name: str) -> dict[str, type]:
    """The schemas of a trainer's data and model sections (none for a name that is no trainer)."""
    try:
        trainer = find_trainer(name)
    except RecipeError:  # a module by that name without a TRAINER
        return {}
    return {"data": trainer.data_config, "model": trainer.model_config} if trainer else {}


@st.composite
def mostly(draw, good: st.SearchStrategy, other: st.SearchStrategy) -> Any:
    """Nine draws in ten from `good`, else from `other`."""
    return draw(good if draw(st.integers(0, 9)) else other)


@st.composite
def damaged(draw, blob: bytes) -> bytes:
    """A good file's bytes: cut short, with a few bytes overwritten, or none."""
    how = draw(st.sampled_from(["cut", "overwritten", "empty"]))
    if how == "cut" and blob:
        return blob[: draw(st.integers(0, len(blob) - 1))]
    if how == "overwritten" and blob:
        out = bytearray(blob)
        for at, byte in draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)), min_size=1,
                                      max_size=4)):
            out[at] = byte
        return bytes(out)
    return b""


def bad_files(good: st.SearchStrategy) -> st.SearchStrategy:
    """Files made from good ones, damaged, or garbage."""
    return good.flatmap(damaged) | st.binary(max_size=300)


@st.composite
def tables(draw, good: dict[str, st.SearchStrategy]) -> pd.DataFrame:
    """A table with most of the columns a reader wants (most of them with good cells, some with anything) and
    maybe others (with cells of one type, or of any)."""
    rows = draw(st.integers(10, 40) if draw(st.integers(0, 4)) else st.integers(0, 9))
    extra = draw(st.lists(st.text(max_size=5), min_size=1, max_size=2)) if not draw(st.integers(0, 3)) else []
    columns = [c for c in good if draw(st.integers(0, 9))] + extra
    frame = {}
    for column in dict.fromkeys(columns):
        cells = good[column] if column in good and draw(st.integers(0, 9)) else draw(COLUMN_CELLS)
        frame[column] = draw(st.lists(cells, min_size=rows, max_size=rows))
    return pd.DataFrame(frame)


def table_bytes(frame: pd.DataFrame, suffix: str) -> bytes:
    """The table as a user's file would hold it (Parquet columns of mixed types as text)."""
    if suffix == ".parquet":
        out = io.BytesIO()
        frame.astype({c: str for c in frame if frame[c].map(type).nunique() > 1}).to_parquet(out)
        return out.getvalue()
    if suffix == ".jsonl":
        return frame.to_json(orient="records", lines=True).encode()
    return frame.to_csv(sep="\t" if suffix == ".tsv" else ",", index=False).encode()


@st.composite
def table_files(draw, good: dict[str, st.SearchStrategy], suffixes: list[str]) -> tuple[str, bytes]:
    """A table file's name and bytes (mostly as written, sometimes damaged or garbage)."""
    suffix = draw(st.sampled_from(suffixes))
    blob = table_bytes(draw(tables(good)), suffix)
    return f"table{suffix}", draw(mostly(st.just(blob), damaged(blob) | st.binary(max_size=200)))


# ---- recipes ----------------------------------------------------------------------------------------------
SHARED = {"optim": OptimConfig, "dist": DistConfig, "run": RunConfig}


def section_value(draw, schema) -> Any:
    """A section: mostly known keys, mostly with their defaults, else with anything; unknown keys; or not a
    mapping at all."""
    if schema is None or not draw(st.integers(0, 9)):
        return draw(VALUES)
    fields = schema.model_fields
    keys = draw(st.lists(mostly(st.sampled_from(sorted(fields)), st.text(max_size=8)), max_size=4, unique=True))
    return {k: fields[k].get_default(call_default_factory=True)
            if k in fields and not fields[k].is_required() and draw(st.integers(0, 9)) else draw(VALUES) for k in keys}


@st.composite
def recipe_trees(draw) -> dict:
    """A recipe as YAML holds it: a trainer (mostly a known one), its sections with known and unknown keys and
    values of any type, or unknown sections."""
    trainer = draw(mostly(st.sampled_from([*registered(), "tests.probe"]), st.text(max_size=12)))
    schemas = {**SHARED, **trainer_sections(trainer)}
    names = draw(st.lists(mostly(st.sampled_from([*schemas, "description"]), st.text(max_size=8)), max_size=5,
                          unique=True))
    tree = {name: section_value(draw, schemas.get(name)) for name in names}
    if "description" in tree and draw(st.integers(0, 3)):
        tree["description"] = draw(st.text(max_size=30))
    if draw(st.integers(0, 9)):
        tree["trainer"] = trainer
    return tree


RECIPE_TEXT = mostly(recipe_trees().map(lambda tree: yaml.safe_dump(tree, allow_unicode=True).encode()),
                     st.text(max_size=200).map(str.encode) | st.binary(max_size=200)
                     | VALUES.map(lambda value: yaml.safe_dump(value).encode()))
KNOWN_KEYS = [f"{section}.{key}" for section, schema in SHARED.items() for key in schema.model_fields]
GOOD_OVERRIDES = st.sampled_from(["optim.lr=3e-4", "optim.batch_size=8", "run.seed=3", "dist.compression=fp16",
                                  "run.max_steps=null", "description=hello"])
OVERRIDES = st.lists(mostly(GOOD_OVERRIDES, st.text(max_size=20) | st.tuples(
    st.sampled_from(KNOWN_KEYS) | st.text(max_size=12), st.text(max_size=12)).map("=".join)), max_size=3)


def assert_round_trips(recipe: Recipe, folder: Path) -> None:
    """What the run directory's config.yaml holds loads back as the same recipe (ddl eval and predict need it)."""
    resolved = recipe.model_dump(mode="json")
    again = load_recipe(write(folder, "config.yaml", yaml.safe_dump(resolved)))
    assert again.model_dump(mode="json") == resolved


@fuzz(150)
@given(RECIPE_TEXT, OVERRIDES)
def test_recipe_files_load_or_say_what_is_wrong(text, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            recipe = load_recipe(write(Path(tmp), "recipe.yaml", text), overrides)
        except RecipeError as e:
            assert str(e).startswith(("recipe ", "override ")), e
            event("RecipeError")
            return
        event("accepted")
        assert_round_trips(recipe, Path(tmp))


# ---- fraud ------------------------------------------------------------------------------------------------
FRAUD_COLUMNS = {"isFraud": st.sampled_from([0, 1]), "TransactionDT": st.integers(0, 10**6),
                 "TransactionID": st.integers(0, 10**9), "amount": st.none() | st.floats(allow_infinity=False),
                 "card": st.none() | st.integers(0, 3) | st.sampled_from(["visa", "amex"])}


@fuzz(60)
@given(table_files(FRAUD_COLUMNS, [".csv", ".parquet"]), st.sampled_from(["[card]", "[card]", "[]"]), st.booleans())
def test_fraud_reader(table, categorical, timed):
    from ddl_apps.trainers.tabular.trainer import build_task

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"data.source={write(Path(tmp), *table)}", f"data.categorical={categorical}",
                     "model.baselines=[]", *([] if timed else ["data.time_column=null"])]
        task = accepted_or_explained(build_task, load_recipe("fraud_mlp", overrides), Topology(0, 1, 0, 1))
    if task is not None:  # no NaN or infinity reaches the model
        assert all(np.isfinite(task.dataset.split(name).load()["numeric"]).all() for name in ("train", "valid", "test"))


@fuzz(40)
@given(tables({"amount": st.none() | st.floats(), "card": CELLS}))
def test_fraud_scoring_of_any_table(frame):
    """`ddl predict` on a table the model never saw: finite features, or one DataError."""
    from ddl_apps.trainers.tabular import data

    training = pd.DataFrame({"amount": [1.0, 2.0, np.nan, 4.0], "card": ["a", "a", "b", None]})
    pre = data.Preprocessor.fit(training, ["amount"], ["card"], load_recipe("fraud_mlp").data)
    transformed = accepted_or_explained(pre.transform, frame)
    if transformed is not None:
        assert np.isfinite(transformed[0]).all() and transformed[1].min(initial=0) >= 0


# ---- text classification ----------------------------------------------------------------------------------
NLP_COLUMNS = {"text": st.text(min_size=1, max_size=15), "label": st.sampled_from(["pos", "neg"] * 3 + ["2", "10"])}


@fuzz(60)
@given(table_files(NLP_COLUMNS, [".csv", ".tsv", ".jsonl"]))
def test_text_reader(table):
    from ddl_apps.trainers.nlp import data

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_recipe("nlp_minilm", [f"data.source={write(Path(tmp), *table)}"]).data
        splits = accepted_or_explained(data.load_splits, cfg)
    if splits is not None:
        for split in (splits.train, splits.valid, splits.test):
            assert split.texts and all(split.texts) and split.labels.max() < len(splits.label_names)


# ---- recommendation ---------------------------------------------------------------------------------------
ITEMS = [f"i{i}" for i in range(12)]
RECSYS_COLUMNS = {"user": st.sampled_from(["u1", "u2", "u3", "u4"]), "item": st.sampled_from(ITEMS),
                  "timestamp": st.integers(0, 100)}
TITLES = {"item": st.sampled_from(ITEMS), "title": st.text(max_size=8)}


@fuzz(50)
@given(table_files(RECSYS_COLUMNS, [".csv", ".jsonl"]), st.none() | table_files(TITLES, [".csv", ".tsv"]))
def test_interactions_reader(table, titles):
    from ddl_apps.trainers.recsys.trainer import build_task

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "titles").mkdir()
        source = write(Path(tmp), *table)
        titled = [f"data.titles={write(Path(tmp) / 'titles', *titles)}"] if titles else []
        recipe = load_recipe("recsys_neumf", [f"data.source={source}", "data.eval_negatives=2",
                                              "data.train_negatives=1", *titled])
        task = accepted_or_explained(build_task, recipe, Topology(0, 1, 0, 1))
    if task is not None:  # each held-out item ranked against two distinct items its user never touched
        candidates = task.dataset.split("test").load()["items"]
        assert candidates.shape[1] == 3 and all(len(set(row)) == 3 for row in candidates.tolist())


# ---- images -----------------------------------------------------------------------------------------------
SAVED_MODES = {"PNG": ["L", "RGB", "P", "RGBA"], "JPEG": ["L", "RGB"], "GIF": ["L", "P"], "BMP": ["L", "RGB", "P"]}


@st.composite
def good_images(draw) -> bytes:
    from PIL import Image

    image_format = draw(st.sampled_from(sorted(SAVED_MODES)))
    side, mode = draw(st.integers(1, 12)), draw(st.sampled_from(SAVED_MODES[image_format]))
    pixels = np.random.default_rng(draw(st.integers(0, 99))).integers(0, 256, (side, side, 4), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGBA").convert(mode).save(out, image_format)
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims to be width x height pixels (a decompression bomb when that is huge)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 9)) + chunk(b"IEND", b"")


BAD_IMAGES = bad_files(good_images()) | st.just(png_header(100_000, 100_000))


def assert_model_input(images, size: int, channels: int) -> None:
    assert images.x.shape == (len(images.y), size, size, channels)
    assert np.isfinite(images.x).all() and images.x.min(initial=0) >= 0 and images.x.max(initial=0) <= 1


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # Pillow's, on converting such GIFs
@fuzz(40)
@given(st.lists(good_images(), min_size=1, max_size=3), st.lists(good_images(), min_size=1, max_size=3),
       st.none() | BAD_IMAGES, st.sampled_from([1, 3]))
def test_image_folder_reader(cats, dogs, bad, channels):
    from ddl_apps.trainers.image import data

    with tempfile.TemporaryDirectory() as tmp:
        for name, files in (("cat", cats), ("dog", dogs + ([bad] if bad is not None else []))):
            (Path(tmp) / name).mkdir()
            for i, blob in enumerate(files):
                write(Path(tmp) / name, f"{i}.png", blob)
        cfg = load_recipe("image_resnet", [f"data.source={tmp}", "data.image_size=8", f"data.channels={channels}"]).data
        images = accepted_or_explained(data.read_images, cfg)
    if images is not None:
        assert_model_input(images, 8, channels)


ANY_ARRAY = hnp.arrays(st.sampled_from(["uint8", "int16", "float32", "float64", "bool", "complex64", "U2",
                                        "datetime64[s]"]), hnp.array_shapes(min_dims=0, max_dims=5, min_side=0))


@st.composite
def npz_files(draw) -> bytes:
    """Images x [n, h, w(, c)] and labels y [n], one of them (or a wrongly named one) maybe anything; saved with
    numpy.savez, and maybe damaged."""
    n, size = draw(st.integers(0, 8)), draw(st.lists(st.integers(1, 6), min_size=2, max_size=3))
    pixels = hnp.arrays(np.uint8, (n, *size)) | hnp.arrays(np.float64, (n, *size), elements=st.floats(0, 1))
    labels = hnp.arrays(np.int64, n, elements=st.integers(0, 2)) | hnp.arrays("U3", n, elements=st.sampled_from("ab"))
    arrays = {"x": draw(pixels), "y": draw(labels)}
    replaced = draw(st.sampled_from(["nothing", "nothing", "x", "y", "images"]))
    if replaced != "nothing":
        arrays[replaced] = draw(ANY_ARRAY)
    out = io.BytesIO()
    np.savez(out, **arrays)
    return draw(st.just(out.getvalue()) | st.just(out.getvalue()) | damaged(out.getvalue()))


@fuzz(60)
@given(mostly(npz_files(), st.binary(max_size=100)),
       st.sampled_from([".npz"] * 4 + [".npy"]))
def test_image_array_reader(blob, suffix):
    from ddl_apps.trainers.image import data

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_recipe("image_resnet", [f"data.source={write(Path(tmp), 'images' + suffix, blob)}",
                                           "data.image_size=8"]).data
        images = accepted_or_explained(data.read_images, cfg)
    if images is not None:
        assert_model_input(images, 8, 1)


# ---- speech -----------------------------------------------------------------------------------------------
@st.composite
def good_audio(draw) -> bytes:
    """A recording in one of the formats libsndfile writes: mostly long enough, sometimes with NaN or infinite
    samples (float formats), at common and odd sample rates."""
    kind = draw(st.sampled_from([("WAV", "PCM_16"), ("WAV", "PCM_U8"), ("WAV", "FLOAT"), ("WAV", "DOUBLE"),
                                 ("FLAC", "PCM_16"), ("OGG", "VORBIS")]))
    rate = draw(st.sampled_from([16000, 8000, 22050, 44100, 7919, 100]))
    frames = draw(st.integers(1000, 4000) if draw(st.integers(0, 9)) else st.integers(0, 999))
    samples = 0.3 * np.sin(np.arange(frames, dtype=np.float64) / 7)[:, None].repeat(draw(st.integers(1, 2)), 1)
    if kind[1] in ("FLOAT", "DOUBLE") and frames and not draw(st.integers(0, 3)):
        samples[draw(st.integers(0, frames - 1)), 0] = draw(st.sampled_from([np.nan, np.inf, 1e300]))
    out = io.BytesIO()
    sf.write(out, samples, rate, format=kind[0], subtype=kind[1])
    return out.getvalue()


def assert_usable_audio(samples: np.ndarray) -> None:
    assert samples.ndim == 1 and samples.dtype == np.float32 and len(samples) >= 800 and np.isfinite(samples).all()


@fuzz(80)
@given(good_audio() | bad_files(good_audio()))
def test_audio_reader(blob):
    """What `ddl transcribe` and the training batches read: 16 kHz samples, or one DataError."""
    from ddl_apps.trainers.asr.audio import load_audio

    with tempfile.TemporaryDirectory() as tmp:
        samples = accepted_or_explained(load_audio, write(Path(tmp), "clip.wav", blob))
    if samples is not None:
        assert_usable_audio(samples)


AUDIO_NAMES = ["a.wav", "b.flac", "nested/c.ogg", "bad.wav"]
ENTRIES = st.fixed_dictionaries({"audio_filepath": st.sampled_from(AUDIO_NAMES[:3] * 3 + ["bad.wav", "missing.wav"]),
                                 "text": st.text(max_size=12)}, optional={"duration": VALUES}).map(json.dumps)


@st.composite
def manifests(draw) -> bytes:
    """JSON lines naming the recordings, maybe with a line that is not an entry; or garbage."""
    if not draw(st.integers(0, 9)):
        return draw(st.binary(max_size=40))
    lines = draw(st.lists(ENTRIES, min_size=1, max_size=3))
    if not draw(st.integers(0, 3)):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=20) | VALUES.map(json.dumps)))
    return "\n".join(lines).encode()


@fuzz(40)
@given(st.lists(good_audio(), min_size=3, max_size=3), bad_files(good_audio()),
       st.lists(manifests(), min_size=3, max_size=3))
def test_speech_corpus_reader(audio, bad, split_manifests):
    """A corpus that passes the check before training is one whose every file the training batches can read:
    a bad file never stops a run that has started."""
    from ddl_apps.trainers.asr import data
    from ddl_apps.trainers.asr.audio import load_audio

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "nested").mkdir()
        for name, blob in zip(AUDIO_NAMES, [*audio, bad], strict=True):
            write(Path(tmp), name, blob)
        for split, lines in zip(("train", "valid", "test"), split_manifests, strict=True):
            write(Path(tmp), f"{split}.jsonl", lines)
        cfg = load_recipe("asr_conformer", [f"data.source={tmp}"]).data
        splits = accepted_or_explained(data.load_splits, data.corpus_folder(cfg), cfg)
        for manifest in splits.values() if splits else []:
            for path in manifest.paths:
                assert_usable_audio(load_audio(path))


# ---- through the CLI --------------------------------------------------------------------------------------
def assert_stops_cleanly(run_dir: Path, recipe: str, *overrides: str, expected: str) -> None:
    result = ddl("train", recipe, f"run.dir={run_dir}", *overrides)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("error:") == 1, result.stderr
    assert not run_dir.exists()


def test_cli_recipe_that_is_not_text(tmp_path):
    write(tmp_path, "binary.yaml", b"trainer: fraud\ndescription: \xff\xfe\x00")
    assert_stops_cleanly(tmp_path / "run", str(tmp_path / "binary.yaml"), expected="is not UTF-8 text")


def test_cli_fraud_table_with_infinite_amounts(tmp_path):
    frame = pd.DataFrame({"isFraud": [0, 1] * 20, "TransactionDT": range(40), "amount": [1.0, np.inf] * 20})
    frame.to_csv(tmp_path / "t.csv", index=False)
    assert_stops_cleanly(tmp_path / "run", "fraud_mlp", f"data.source={tmp_path / 't.csv'}", "data.categorical=[]",
                         "data.id_column=null", expected="column 'amount' holds infinite values")


def test_cli_text_table_without_the_label_column(tmp_path):
    lines = "".join(json.dumps({"text": f"review {i}", "stars": i % 2}) + "\n" for i in range(30))
    write(tmp_path, "reviews.jsonl", lines)
    assert_stops_cleanly(tmp_path / "run", "nlp_minilm", f"data.source={tmp_path / 'reviews.jsonl'}",
                         expected="has no column 'label'")


def test_cli_speech_manifest_with_a_cut_off_recording(tmp_path):
    """The file's header is fine; its samples stop after 1 ms: caught before training, not in its first epoch."""
    for i in range(3):
        sf.write(tmp_path / f"{i}.wav", 0.1 * np.sin(np.arange(8000) / 5), 16000)
    full = io.BytesIO()
    sf.write(full, np.zeros(16000), 16000, format="WAV", subtype="PCM_16")
    write(tmp_path, "cut.wav", full.getvalue()[:44 + 32])
    for split in ("train", "valid", "test"):
        names = [f"{i}.wav" for i in range(3)] + (["cut.wav"] if split == "valid" else [])
        entries = [json.dumps({"audio_filepath": name, "text": "go"}) for name in names]
        write(tmp_path, f"{split}.jsonl", "\n".join(entries))
    assert_stops_cleanly(tmp_path / "run", "asr_conformer", f"data.source={tmp_path}",
                         expected=f"audio file {tmp_path / 'cut.wav'} is empty or shorter than 50 ms")


def test_cli_image_that_claims_ten_billion_pixels(tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / name / f"{i}.png")
    write(tmp_path / "dog", "bomb.png", png_header(100_000, 100_000))
    assert_stops_cleanly(tmp_path / "run", "image_resnet", f"data.source={tmp_path}",
                         expected=f"cannot read image {tmp_path / 'dog' / 'bomb.png'}: Image size")


def test_cli_training_set_smaller_than_one_step(tmp_path):
    assert_stops_cleanly(tmp_path / "run", PROBE, "data.train_examples=10", "optim.batch_size=32",
                         expected="the training set (10 examples) is smaller than one global step")


def test_cli_messages_keep_their_brackets(tmp_path):
    """A message is text, not console markup: '[2024]' in a path and '[/]' in a key reach the user as they are."""
    shown = ddl("show", "fraud_mlp", "optim.[/]=1")
    assert shown.returncode == 2 and "optim.[/]: unknown key" in shown.stderr and "Traceback" not in shown.stderr
    missing = tmp_path / "[2024]" / "none.csv"
    assert_stops_cleanly(tmp_path / "run", "fraud_mlp", f"data.source={missing}", expected=f"{missing} does not exist")
