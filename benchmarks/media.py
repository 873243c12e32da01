"""`make bench` part `data`, issue 23: the image and speech recipes from prepared shards of encoded files.

- images: a folder of 100,000 PNG / JPEG files made here from the shipped MNIST digits (each a random digit of
  the 5,000, shifted, rotated, scaled to 24-40 px, one in five saved as JPEG; not committed, made under the
  benchmark scratch folder), and its first 10,000 files;
- speech: a corpus of over 20 hours of training speech (`ddl data asr-commands`, see speech_corpus), and its first
  tenth (data.limit);
- for each: prepare time and shard size; each worker's peak anonymous memory and time to the first step at 1x and
  10x the files, np=1 and np=2; the input pipeline alone on one core against the training step; training samples/s
  from shards against the in-memory path on the shipped data.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from benchmarks.common import LAUNCH_ENV, VENV_BIN, spread
from benchmarks.data import SCRATCH, built_task, one_core, train

IMAGE, SPEECH = "image_resnet", "asr_conformer"
IMAGE_RUN = ("run.progress=false",)
SPEECH_RUN = ("run.progress=false",)
IMAGE_FILES, SPEECH_UTTERANCES = 100_000, 40_000


# ---- data made here --------------------------------------------------------------------------------------------
def _write_images(job: tuple[str, int, int]) -> None:
    """Files start..start+count of the generated folder (a process of a pool)."""
    from PIL import Image

    from ddl_apps.trainers.image.data import read_mnist_5k

    root, start, count = job
    digits, labels, _ = read_mnist_5k()
    for number in range(start, start + count):
        rng = np.random.default_rng(number)
        pick = int(rng.integers(len(digits)))
        image = Image.fromarray(digits[pick, ..., 0]).rotate(float(rng.uniform(-15, 15)),
                                                             translate=tuple(rng.integers(-3, 4, 2).tolist()))
        size = int(rng.integers(24, 41))
        image = image.resize((size, size), Image.Resampling.BILINEAR)
        folder = Path(root) / str(labels[pick])
        if number % 5 == 0:
            image.save(folder / f"{number:06d}.jpg", quality=90)
        else:
            image.save(folder / f"{number:06d}.png")


def image_folder(count: int) -> Path:
    """A folder of `count` generated digit files in class sub-folders (made once; a file's content depends only
    on its number, so the 10,000-file folder is the first tenth of the 100,000-file one)."""
    target = SCRATCH / f"images-{count}"
    if (target / "done").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    for digit in range(10):
        (target / str(digit)).mkdir(parents=True)
    jobs = [(str(target), start, min(5000, count - start)) for start in range(0, count, 5000)]
    started = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count(), mp_context=get_context("spawn")) as pool:
        list(pool.map(_write_images, jobs))
    (target / "done").write_text(f"{time.perf_counter() - started:.1f}")  # the seconds it took
    return target


def speech_corpus() -> Path:
    """A corpus of over 20 hours: the generated corpus of 40,000 training utterances (seed 0; 17.2 hours with its
    evaluation splits) and 8,000 more training utterances (seed 1; their voices may include seed 0's held-out ones,
    which matters to accuracy, not to what is measured here), merged by manifests naming the files absolutely."""
    target = SCRATCH / "speech-20h"
    if (target / "corpus.json").exists():
        return target
    parts = [(SCRATCH / f"speech-{SPEECH_UTTERANCES}", 0, SPEECH_UTTERANCES, "400"),
             (SCRATCH / "speech-extra", 1, SPEECH_UTTERANCES // 5, "1")]
    for folder, seed, train_count, eval_count in parts:
        if not (folder / "corpus.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            subprocess.run([str(VENV_BIN / "ddl"), "data", "asr-commands", str(folder), "--train", str(train_count),
                            "--eval", eval_count, "--seed", str(seed)], check=True, env={**os.environ, **LAUNCH_ENV})
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    splits = {"train": [folder for folder, *_ in parts], "valid": [parts[0][0]], "test": [parts[0][0]]}
    for split, folders in splits.items():
        lines = []
        for folder in folders:
            for line in (folder / f"{split}.jsonl").read_text().splitlines():
                entry = json.loads(line)
                lines.append(json.dumps({**entry, "audio_filepath": str(folder / entry["audio_filepath"])}))
        (target / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    train_hours = sum(json.loads(line)["duration"] for line in (target / "train.jsonl").read_text().splitlines())
    (target / "corpus.json").write_text(json.dumps({"train_hours": round(train_hours / 3600, 2)}))
    return target


def prepare(recipe: str, target: Path, *overrides: str) -> dict:
    """`ddl data prepare` into `target` (anew): seconds and GiB on disk."""
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([str(VENV_BIN / "ddl"), "data", "prepare", recipe, *overrides, "-o", str(target)], check=True,
                   env={**os.environ, **LAUNCH_ENV}, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    manifest = json.loads((target / "manifest.json").read_text())
    return {"seconds": round(seconds, 1), "gib": round(sum(p.stat().st_size for p in target.iterdir()) / 2**30, 3),
            "train_rows": sum(s["rows"] for s in manifest["splits"]["train"])}


# ---- the measurements ------------------------------------------------------------------------------------------
def flat(recipe: str, sources: dict[str, tuple[str, ...]], prepared: dict[str, Path], steps: int,
         scratch: Path) -> dict:
    """Each size's peak memory per worker and time to the first step, np=2 and np=1 (`sources`: each size's data
    overrides, which the prepared data is checked against)."""
    base = ("run.progress=false", f"run.max_steps={steps}", "run.log_every=1")
    rows = {size: {np_: train(scratch / f"{recipe}-{size}-np{np_}", f"data.prepared={prepared[size]}",
                              *sources[size], np_=np_, recipe=recipe, base=base) for np_ in (2, 1)}
            for size in prepared}
    small, large = rows
    peak = {size: max(row[2]["peak_rss_anon_mib"]) for size, row in rows.items()}
    return {"runs": {size: {f"np{n}": r for n, r in row.items()} for size, row in rows.items()},
            "memory_ratio": round(peak[large] / peak[small], 3),
            "first_step_np2_vs_np1": {size: round(row[2]["worker_first_step_s"] / row[1]["worker_first_step_s"], 3)
                                      for size, row in rows.items()}}


def shards_against_memory(recipe: str, base: tuple[str, ...], shipped: Path, steps: int, scratch: Path) -> dict:
    """Training samples/s from the shipped data's shards against the in-memory path, np=1, in turns."""
    rates: dict[str, list[float]] = {"shards": [], "in_memory": []}
    for turn in range(2):
        for side, extra in (("shards", (f"data.prepared={shipped}",)), ("in_memory", ())):
            run = train(scratch / f"{recipe}-{side}-{turn}", *extra, f"run.max_steps={steps}", recipe=recipe,
                        base=base)
            rates[side].append(run["samples_per_s"]["median"])
    return {"shards_samples_per_s": rates["shards"], "in_memory_samples_per_s": rates["in_memory"],
            "ratio": round(statistics.median(rates["shards"]) / statistics.median(rates["in_memory"]), 3)}


def one_core_rate(measure) -> float:
    """`measure()` (samples, seconds) on one core: samples/s."""
    with one_core():
        samples, seconds = measure()
    return samples / seconds


def image_pipeline(overrides: tuple[str, ...], seconds: float = 15.0) -> dict:
    """The image recipe's input pipeline on one core, stage by stage: reading the shards, + decoding and resizing,
    + augmenting (the recipe's random affine in TensorFlow), at the recipe's batch."""
    import tensorflow as tf

    config, task = built_task(IMAGE, list(overrides))
    augment = tf.function(task.augment, reduce_retracing=True)

    def stage(decode: bool, augmented: bool):
        def measure():
            started, samples = time.perf_counter(), 0
            for epoch in range(100):
                for (columns,) in task.train.rank_steps(epoch, 0, config.optim.batch_size, 0, 1, 1):
                    if decode:
                        x, y = task.decode(columns)
                        if augmented:
                            augment(x, y, tf.constant([0, samples], tf.int64))[0].numpy()
                    samples += len(columns["label"])
                    if time.perf_counter() - started > seconds:
                        return samples, time.perf_counter() - started
            return samples, time.perf_counter() - started
        return measure

    return {name: round(one_core_rate(stage(*flags)), 1) for name, flags in
            (("read", (False, False)), ("read_decode_resize", (True, False)),
             ("read_decode_resize_augment", (True, True)))}


def speech_pipeline(overrides: tuple[str, ...], seconds: float = 20.0) -> dict:
    """The speech recipe's training stream on one core: read, decode, resample, speed, log-mel, pad."""
    config, task = built_task(SPEECH, list(overrides))

    def measure():
        started, samples = time.perf_counter(), 0
        for (batch,) in task.train.rank_steps(0, 0, config.optim.batch_size, 0, 1, 1):
            samples += len(batch["lengths"])
            if time.perf_counter() - started > seconds:
                break
        return samples, time.perf_counter() - started

    return {"read_decode_features": round(one_core_rate(measure), 1)}


def training_step(recipe: str, base: tuple[str, ...], steps: int, scratch: Path) -> float:
    """The training step's samples/s, np=1, data in memory (the recipe's in-memory path on the shipped data)."""
    return train(scratch / f"{recipe}-step", f"run.max_steps={steps}", recipe=recipe, base=base)["samples_per_s"][
        "median"]


def images(scratch: Path) -> dict:
    folders = {"10k": image_folder(IMAGE_FILES // 10), "100k": image_folder(IMAGE_FILES)}
    generated = float((folders["100k"] / "done").read_text() or "nan")
    sources = {size: (f"data.source={folder}",) for size, folder in folders.items()}
    prepared = {size: SCRATCH / f"image-prepared-{size}" for size in folders}
    preparing = {size: prepare(IMAGE, prepared[size], *sources[size]) for size in folders}
    shipped = SCRATCH / "image-prepared-shipped"
    preparing["shipped"] = prepare(IMAGE, shipped)
    step = training_step(IMAGE, IMAGE_RUN, 150, scratch)
    pipeline = {k: spread([v], 1) for k, v in
                image_pipeline((*sources["100k"], f"data.prepared={prepared['100k']}")).items()}
    return {"generate_seconds": round(generated, 1), "prepare": preparing,
            "flat": flat(IMAGE, sources, prepared, 60, scratch),
            "input": {"pipeline_one_core_samples_per_s": pipeline, "training_step_samples_per_s": step,
                      "ratio": round(pipeline["read_decode_resize_augment"]["median"] / step, 2)},
            "shipped": shards_against_memory(IMAGE, IMAGE_RUN, shipped, 150, scratch)}


def speech(scratch: Path) -> dict:
    corpus = speech_corpus()
    hours = json.loads((corpus / "corpus.json").read_text())["train_hours"]
    sources = {"1x": (f"data.source={corpus}", f"data.limit={SPEECH_UTTERANCES * 6 // 50}"),  # a tenth of 48,000
               "10x": (f"data.source={corpus}",)}
    prepared = {size: SCRATCH / f"speech-prepared-{size}" for size in sources}
    preparing = {size: prepare(SPEECH, prepared[size], *sources[size]) for size in sources}
    shipped = SCRATCH / "speech-prepared-shipped"
    preparing["shipped"] = prepare(SPEECH, shipped)
    step = training_step(SPEECH, SPEECH_RUN, 40, scratch)
    pipeline = speech_pipeline((*sources["10x"], f"data.prepared={prepared['10x']}"))["read_decode_features"]
    return {"hours": hours, "prepare": preparing,
            "flat": flat(SPEECH, sources, prepared, 20, scratch),
            "input": {"pipeline_one_core_samples_per_s": {"read_decode_features": spread([pipeline], 1)},
                      "training_step_samples_per_s": step,
                      "ratio": round(pipeline / step, 2)},
            "shipped": shards_against_memory(SPEECH, SPEECH_RUN, shipped, 40, scratch)}
