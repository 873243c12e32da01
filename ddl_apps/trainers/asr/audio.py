"""Reading audio for the speech trainer: any format libsndfile reads, mixed down to mono, resampled to 16 kHz."""

from __future__ import annotations

import io
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from ddl_apps.errors import DataError

SAMPLE_RATE = 16_000
MIN_SAMPLES = SAMPLE_RATE // 20  # 50 ms: shorter files hold no speech worth a transcript


def resample(audio: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return audio.astype(np.float32, copy=False)
    common = gcd(rate, SAMPLE_RATE)
    return resample_poly(audio, SAMPLE_RATE // common, rate // common).astype(np.float32)


def read_samples(path: Path, encoded: bytes | None = None) -> tuple[np.ndarray, int]:
    """Mono float32 samples of an audio file (read from `encoded`, its bytes, when given) at its own rate, and the
    rate; or a DataError naming the file and what is wrong (unreadable, corrupt, shorter than 50 ms, NaN or
    infinite samples)."""
    try:
        audio, rate = sf.read(str(path) if encoded is None else io.BytesIO(encoded), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise DataError(f"cannot read audio file {path}: {e}. Is it a WAV/FLAC/OGG file? Re-export or remove it "
                        "from the manifest.") from None
    if len(audio) * SAMPLE_RATE < MIN_SAMPLES * rate:  # shorter than 50 ms at its own rate
        raise DataError(f"audio file {path} is empty or shorter than 50 ms ({len(audio)} samples at {rate} Hz); "
                        "remove it from the manifest")
    audio = audio.mean(axis=1)
    if not np.isfinite(audio).all():
        raise DataError(f"audio file {path} holds NaN or infinite samples; re-export it")
    return audio, rate


def load_audio(path: Path, encoded: bytes | None = None) -> np.ndarray:
    """16 kHz mono float32 samples of an audio file (or of its bytes), or a DataError (see read_samples)."""
    return resample(*read_samples(path, encoded))
