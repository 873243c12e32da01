"""`ddl data asr-commands OUT_DIR`: a labelled spoken-command corpus synthesised with Debian's espeak-ng.

Utterances of one to four words from a vocabulary of digits and command words, spoken by many voices (8 English
accents x espeak-ng's voice variants) at random speeds and pitches, with background noise at a random SNR.
Whole voice variants are held out: the validation and test splits are spoken only by variants that no training
utterance uses, so they measure generalisation to unheard speakers. Everything is drawn from one seeded
generator, and espeak-ng is deterministic, so a seed gives the same corpus byte for byte.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from ddl_apps.cpus import usable_cpus
from ddl_apps.errors import DataError
from ddl_apps.trainers.asr.audio import SAMPLE_RATE, resample

DIGITS = "zero one two three four five six seven eight nine".split()
COMMANDS = ("yes no up down left right on off stop go start open close turn play pause next back forward "
            "lights music volume door window heat fan alarm call home").split()
VOCABULARY = DIGITS + COMMANDS
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
           "en-us-nyc"]
# espeak-ng's variants that sound like speakers (not robots, whispers or effects)
VARIANTS = ("Alex Alicia Andrea Andy Annie AnxiousAndy Denis Diogo Gene Gene2 Henrique Hugo Jacky Lee Marco Mario "
            "Michael Mike Nguyen Storm adam anika announcer antonio aunty belinda benjamin boris caleb david ed "
            "edward edward2 f1 f2 f3 f4 f5 grandma grandpa gustave iven iven2 iven3 iven4 john kaukovalta klatt "
            "klatt2 klatt3 klatt4 klatt5 klatt6 linda m1 m2 m3 m4 m5 m6 m7 m8 marcelo max michel miguel norbert "
            "pablo paul pedro quincy rob robert sandro shelby steph steph2 steph3 travis victor zac").split()
HELD_OUT = {"valid": 8, "test": 12}  # voice variants reserved for each evaluation split
MANIFESTS = {split: f"{split}.jsonl" for split in ("train", "valid", "test")}


@dataclass(frozen=True)
class Utterance:
    path: str
    text: str
    voice: str
    speed: int  # words per minute
    pitch: int  # 0..99
    snr_db: float
    noise_seed: int


def voice_split(seed: int) -> dict[str, list[str]]:
    """Voice variants per split: disjoint, chosen by the seed."""
    variants = list(np.random.default_rng([seed, 1]).permutation(VARIANTS))
    valid, test = HELD_OUT["valid"], HELD_OUT["test"]
    return {"valid": variants[:valid], "test": variants[valid : valid + test], "train": variants[valid + test :]}


def plan(counts: dict[str, int], seed: int) -> dict[str, list[Utterance]]:
    """What every file will say and how: all random choices, made up front."""
    rng = np.random.default_rng([seed, 2])
    voices = voice_split(seed)
    splits = {}
    for split, count in counts.items():
        utterances = []
        for i in range(count):
            words = rng.choice(VOCABULARY, size=rng.integers(1, 5))
            voice = f"{rng.choice(ACCENTS)}+{rng.choice(voices[split])}"
            utterances.append(Utterance(f"audio/{split}/{i:05d}.wav", " ".join(words), voice,
                                        int(rng.integers(130, 200)), int(rng.integers(25, 75)),
                                        round(float(rng.uniform(5, 30)), 1), int(rng.integers(2**31))))
        splits[split] = utterances
    return splits


def synthesize(utterance: Utterance) -> np.ndarray:
    """16 kHz float32 speech for one utterance, with its background noise."""
    wav = subprocess.run(["espeak-ng", "-v", utterance.voice, "-s", str(utterance.speed), "-p", str(utterance.pitch),
                          "--stdout", utterance.text], capture_output=True, check=True).stdout
    speech, rate = sf.read(io.BytesIO(wav), dtype="float32")
    speech = resample(speech, rate)
    rng = np.random.default_rng(utterance.noise_seed)
    pad = rng.integers(800, 4000, size=2)  # 50-250 ms of noise before and after the speech
    speech = np.concatenate([np.zeros(pad[0], np.float32), speech, np.zeros(pad[1], np.float32)])
    noise = coloured_noise(rng, len(speech))
    speech_power = np.mean(speech**2) + 1e-12
    noise *= np.sqrt(speech_power / (np.mean(noise**2) * 10 ** (utterance.snr_db / 10)))
    mixed = speech + noise
    return (mixed / max(1.0, np.abs(mixed).max() / 0.95)).astype(np.float32)


def coloured_noise(rng: np.random.Generator, length: int) -> np.ndarray:
    """White noise mixed with brown (integrated, low-frequency) noise in a random proportion: hum and hiss."""
    white = rng.standard_normal(length)
    brown = np.cumsum(rng.standard_normal(length))
    brown -= np.convolve(brown, np.ones(401) / 401, mode="same")  # remove the drift, keep the rumble
    brown /= brown.std() + 1e-12
    share = rng.uniform(0, 1)
    return (share * white + (1 - share) * brown).astype(np.float32)


def _write(job: tuple[str, Utterance]) -> float:
    root, utterance = job
    audio = synthesize(utterance)
    sf.write(Path(root) / utterance.path, audio, SAMPLE_RATE, subtype="PCM_16")
    return len(audio) / SAMPLE_RATE


def generate(out_dir: Path, counts: dict[str, int], seed: int = 0, workers: int | None = None,
             progress: bool = True) -> dict[str, Path]:
    """Write the corpus (audio/ and one JSON-lines manifest per split) into out_dir; returns the manifests.

    Written into a temporary sibling folder and renamed at the end, so an interrupted run leaves nothing
    that looks like a corpus."""
    if shutil.which("espeak-ng") is None:
        raise DataError("espeak-ng is not installed: run 'make setup' (or apt-get install espeak-ng)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir} exists and is not empty: choose a new folder or remove it")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    splits = plan(counts, seed)
    for split in splits:
        (partial / "audio" / split).mkdir(parents=True)
    jobs = [(str(partial), u) for utterances in splits.values() for u in utterances]
    # spawn, not fork: this may run inside a Horovod worker, whose background threads a fork would not carry
    with ProcessPoolExecutor(workers or usable_cpus(), mp_context=multiprocessing.get_context("spawn")) as pool:
        durations = list(_track(pool.map(_write, jobs, chunksize=16), len(jobs), progress))
    it = iter(durations)
    for split, utterances in splits.items():
        with (partial / MANIFESTS[split]).open("w") as f:
            for u in utterances:
                f.write(json.dumps({"audio_filepath": u.path, "text": u.text, "duration": round(next(it), 3),
                                    "voice": u.voice}) + "\n")
    info = {"seed": seed, "counts": counts, "vocabulary": VOCABULARY, "voices": voice_split(seed),
            "sample_rate": SAMPLE_RATE, "hours": round(sum(durations) / 3600, 3)}
    (partial / "corpus.json").write_text(json.dumps(info, indent=1))
    if out_dir.exists():
        out_dir.rmdir()
    partial.rename(out_dir)
    return {split: out_dir / MANIFESTS[split] for split in splits}


def _track(results, total: int, progress: bool):
    if not progress:
        yield from results
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task("synthesising", total=total)
        for result in results:
            bar.advance(task)
            yield result
