"""Issue 23: the image recipe from prepared shards of encoded images: every bad file named while preparing; mixed
modes and EXIF rotation decoded upright; streamed training (np=1, np=2, resumed, read into memory, from S3) with
the same weights and predictions; `ddl predict` agrees with the evaluation of a run trained from shards."""

import io

import numpy as np
import pytest
from PIL import Image

from ddl_apps.core.metrics import read_metrics
from ddl_apps.data.dataset import PreparedDataset
from ddl_apps.trainers.image import data, prepared
from tests.data.s3_server import s3_server
from tests.engine_runs import ddl, final_weights, summary, train, trained
from tests.trainers.image.test_image import shapes_folder

IMAGE = "image_resnet"
SLICE = ("data.limit=600", "optim.epochs=2", "optim.warmup_steps=3", "optim.batch_size=32", "model.width=8",
         "run.log_every=5")
AS_TWO_WORKERS = ("dist.batch_workers=2",)  # one worker running the two workers' micro-batches


def encoded(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, **save)
    return out.getvalue()


def picture(size=(24, 16)) -> Image.Image:
    """An RGB picture that is not symmetric, so a rotation shows."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:4, :] = (250, 30, 30)
    pixels[:, :3] = (30, 250, 30)
    return Image.fromarray(pixels)


def test_mixed_modes_and_exif_rotation_decode_upright_in_grey_or_rgb():
    upright = picture()
    rotated = upright.transpose(Image.Transpose.ROTATE_90)  # stored turned; EXIF orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "rgb png": encoded(upright, format="PNG"),
        "grey png": encoded(upright.convert("L"), format="PNG"),
        "rgba png": encoded(upright.convert("RGBA"), format="PNG"),
        "palette png": encoded(upright.convert("P"), format="PNG"),
        "16-bit png": encoded(upright.convert("L").convert("I;16"), format="PNG"),
        "gif": encoded(upright, format="GIF"),
        "exif-rotated jpeg": encoded(rotated, format="JPEG", quality=100, exif=exif),
    }
    kept, height, width = prepared.checked(files["rgb png"], channels=3)
    assert kept == files["rgb png"] and (height, width) == (16, 24)  # a file training can read as it is stays itself
    for name, file in files.items():
        for channels in (1, 3):
            stored, height, width = prepared.checked(file, channels)
            assert (height, width) == (16, 24), name
            pixels = data.decode_image(stored, 32, channels)
            assert pixels.shape == (32, 32, channels), name
            like = "grey png" if name in ("grey png", "16-bit png") else "rgb png"  # (grey has no colour to give)
            reference = data.decode_image(files[like], 32, channels).astype(int)
            tolerance = 30 if name in ("gif", "palette png", "exif-rotated jpeg") else 2  # 256 colours; JPEG
            assert np.abs(pixels.astype(int) - reference).mean() <= tolerance / 3, (name, channels)


def test_prepare_names_every_bad_file_and_writes_nothing(tmp_path):
    shapes_folder(tmp_path / "shapes", per_class=4)
    good = (tmp_path / "shapes" / "square" / "0.png").read_bytes()
    bad = {"corrupt.png": b"\x89PNG not really", "empty.png": b"", "cut.png": good[: len(good) // 2],
           "bomb.png": encoded(Image.new("L", (10_000, 9_000)), format="PNG")}  # 90 M pixels, 90 kB
    for name, content in bad.items():
        (tmp_path / "shapes" / "vertical" / name).write_bytes(content)
    out = tmp_path / "prepared"
    result = ddl("data", "prepare", IMAGE, f"data.source={tmp_path / 'shapes'}", "-o", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "4 image file(s) cannot be used" in result.stderr, result.stderr
    for name, why in [("corrupt.png", "cannot identify"), ("empty.png", "empty (0 bytes)"), ("cut.png", "truncated"),
                      ("bomb.png", "decompression bomb")]:
        assert f"{name}: " in result.stderr and why in result.stderr, (name, result.stderr)
    assert not out.exists()

    np.savez(tmp_path / "nan.npz", x=np.full((20, 8, 8), np.nan, np.float32), y=np.arange(20) % 2)
    result = ddl("data", "prepare", IMAGE, f"data.source={tmp_path / 'nan.npz'}", "-o", str(out))
    assert result.returncode == 2 and "NaN" in result.stderr and not out.exists(), result.stderr


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("image") / "prepared"
    result = ddl("data", "prepare", IMAGE, "data.limit=600", "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def streamed_alone(shards, tmp_path_factory):
    """One worker streaming the shards with the micro-batches of two, stopped mid-epoch and resumed."""
    run = tmp_path_factory.mktemp("alone") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # the same arithmetic as each of two workers on one core
        train(run, *SLICE, *AS_TWO_WORKERS, f"data.prepared={shards}", "run.max_steps=11", recipe=IMAGE)
        train(run, *SLICE, *AS_TWO_WORKERS, f"data.prepared={shards}", recipe=IMAGE, flags=("--resume",))
    return run


def test_shards_hold_the_split_encoded(shards):
    dataset = PreparedDataset(str(shards))
    assert dataset.manifest.fitted["classes"] == [str(d) for d in range(10)]
    test = dataset.split("test").load()
    assert len(test["image"]) == 120 and {int(h) for h in test["height"]} == {28}
    assert Image.open(io.BytesIO(test["image"][0])).format == "PNG"


# Slow because it must: two Keras runs (in memory, two workers) against the streamed one.
@pytest.mark.distributed
def test_two_workers_streaming_shards_train_as_one_and_as_in_memory(shards, streamed_alone, tmp_path, monkeypatch):
    """One worker holding the prepared split in memory ends with the weights and the test predictions of the one
    streaming it, stopped and resumed; two workers streaming, with its trained weights (BatchNorm's moving
    statistics aside: N workers average theirs) and the same logged losses. Augmentation and dropout included."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    in_memory = train(tmp_path / "memory", *SLICE, *AS_TWO_WORKERS, f"data.prepared={shards}", "data.stream=false",
                      recipe=IMAGE)
    np.testing.assert_allclose(final_weights(in_memory), final_weights(streamed_alone), rtol=0, atol=1e-5)
    assert np.array_equal(np.load(in_memory / "test_outputs.npz")["pred"],
                          np.load(streamed_alone / "test_outputs.npz")["pred"])
    two = train(tmp_path / "two", *SLICE, f"data.prepared={shards}", np=2, recipe=IMAGE)
    assert summary(two)["steps"] == summary(streamed_alone)["steps"]
    np.testing.assert_allclose(final_weights(two, trained), final_weights(streamed_alone, trained), rtol=0, atol=1e-5)
    losses = {run: [row["loss"] for row in read_metrics(run) if row["split"] == "train"] for run in (two, in_memory)}
    np.testing.assert_allclose(losses[two], losses[in_memory], rtol=1e-5)
    assert losses[two][-1] < 0.95 * losses[two][0], losses  # it learns


def test_predict_on_the_image_files_agrees_with_the_evaluation_from_shards(shards, streamed_alone, tmp_path):
    test = PreparedDataset(str(shards)).split("test").load()
    files = []
    for i, image in enumerate(test["image"][:30]):
        (tmp_path / f"{i}.png").write_bytes(image)
        files.append(str(tmp_path / f"{i}.png"))
    printed = ddl("predict", str(streamed_alone), *files)
    assert printed.returncode == 0, printed.stderr
    predicted = [int(line.split("\t")[1]) for line in printed.stdout.splitlines()]
    assert predicted == np.load(streamed_alone / "test_outputs.npz")["pred"][:30].tolist()


def test_train_from_shards_on_a_local_s3_server(streamed_alone, tmp_path, monkeypatch):
    """Prepared into a bucket (served by moto), trained from it: the weights of the local shards."""
    with s3_server("ddl-images") as aws:
        for key, value in {**aws, "DDL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}.items():
            monkeypatch.setenv(key, value)
        url = "s3://ddl-images/digits"
        result = ddl("data", "prepare", IMAGE, "data.limit=600", "-o", url)
        assert result.returncode == 0, result.stderr
        run = train(tmp_path / "run", *SLICE, *AS_TWO_WORKERS, f"data.prepared={url}", recipe=IMAGE)
    np.testing.assert_allclose(final_weights(run), final_weights(streamed_alone), rtol=0, atol=1e-5)
    secret = aws["AWS_SECRET_ACCESS_KEY"].encode()
    assert not [p for p in run.rglob("*") if p.is_file() and secret in p.read_bytes()]
