"""Rebuild the shipped spoken-command set (src/{{ cookiecutter.package }}/data/builtin/speech_commands.npz).

    sudo apt-get install espeak-ng          # needed here only, never at training time
    python scripts/build_speech_commands.py [--clips-per-word 1] [--seed 1234]

Every espeak-ng English voice variant (its "speaker": formants, breathiness, pitch range) says each of the ten
commands ``--clips-per-word`` times, each time with a random English accent, speed (words per minute) and pitch. The
clips are resampled to 8 kHz, their leading/trailing silence is cut at -40 dB with a 30 ms margin (the loader pads
and shifts them back into one second in numpy, so no plosive is clipped), peak-normalised and stored as 8-bit mu-law
in one compressed .npz with a manifest (word, voice, accent, speed, pitch, split) that numpy reads with no pickle.
Validation and test hold out whole voices, so the score says how well the model hears a speaker it never heard.
"""

from __future__ import annotations

import argparse
import io
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from {{ cookiecutter.package }}.data.speech import BUILTIN_SPEECH, SPLITS, WORDS
from {{ cookiecutter.package }}.data.wav import mulaw_encode, read_wav

RATE = 8000  # telephone band: commands stay intelligible and the set fits the size budget
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")
SPEED = (110, 210)  # words per minute; espeak-ng's default is 175
PITCH = (15, 85)  # 0-99, default 50
VAL_VOICES, TEST_VOICES = 10, 16


def variants() -> list[str]:
    """espeak-ng's voice variants (``!v/<name>`` in ``espeak-ng --voices=variant``), plus the plain voice."""
    out = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = {line.split()[4].removeprefix("!v/") for line in out.splitlines()[1:] if "!v/" in line}
    return ["default", *sorted(names, key=str.lower)]


def synthesise(word: str, accent: str, variant: str, speed: int, pitch: int) -> np.ndarray:
    voice = accent if variant == "default" else f"{accent}+{variant}"
    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word]
    data = subprocess.run(cmd, capture_output=True, check=True).stdout  # 16-bit mono WAV at 22,050 Hz
    return read_wav(io.BytesIO(data), RATE)


def trim(x: np.ndarray, floor_db: float = -40.0, margin_s: float = 0.03) -> np.ndarray:
    """Cut the silence before and after the utterance (espeak-ng pads both ends), keeping a margin."""
    loud = np.flatnonzero(np.abs(x) > np.abs(x).max() * 10 ** (floor_db / 20))
    margin = int(margin_s * RATE)
    start, end = max(loud[0] - margin, 0), min(loud[-1] + margin + 1, len(x))
    return x[start:end][:RATE]  # at most one second


def plan(seed: int, clips_per_word: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    voices = variants()
    order = rng.permutation(len(voices))
    split_of = {
        voices[i]: 1 if k < VAL_VOICES else 2 if k < VAL_VOICES + TEST_VOICES else 0 for k, i in enumerate(order)
    }
    return [
        {
            "word": word,
            "voice": voice,
            "accent": str(rng.choice(ACCENTS)),
            "speed": int(rng.integers(SPEED[0], SPEED[1] + 1)),
            "pitch": int(rng.integers(PITCH[0], PITCH[1] + 1)),
            "split": split_of[voice],
        }
        for voice in voices
        for word in WORDS
        for _ in range(clips_per_word)
    ]


def build(clips: list[dict], workers: int) -> dict[str, np.ndarray]:
    def one(c: dict) -> np.ndarray:
        x = trim(synthesise(c["word"], c["accent"], c["voice"], c["speed"], c["pitch"]))
        return mulaw_encode(0.9 * x / np.abs(x).max())

    with ThreadPoolExecutor(workers) as pool:
        codes = list(pool.map(one, clips))
    voices = sorted({c["voice"] for c in clips}, key=str.lower)
    return {
        "audio": np.concatenate(codes),
        "offsets": np.cumsum([0] + [len(c) for c in codes]).astype(np.int64),
        "word": np.array([WORDS.index(c["word"]) for c in clips], dtype=np.int8),
        "voice": np.array([voices.index(c["voice"]) for c in clips], dtype=np.int16),
        "accent": np.array([ACCENTS.index(c["accent"]) for c in clips], dtype=np.int8),
        "speed": np.array([c["speed"] for c in clips], dtype=np.int16),
        "pitch": np.array([c["pitch"] for c in clips], dtype=np.int8),
        "split": np.array([c["split"] for c in clips], dtype=np.int8),
        "words": np.array(WORDS),
        "voices": np.array(voices),
        "accents": np.array(ACCENTS),
        "splits": np.array(SPLITS),
        "sample_rate": np.array(RATE),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips-per-word", type=int, default=1, help="clips of each word per voice (each ~2.8 kB)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--workers", type=int, default=2, help="espeak-ng processes at a time")
    parser.add_argument("--out", type=Path, default=BUILTIN_SPEECH)
    args = parser.parse_args()
    arrays = build(plan(args.seed, args.clips_per_word), args.workers)
    np.savez_compressed(args.out, **arrays)
    n, voices = len(arrays["word"]), len(arrays["voices"])
    print(f"{args.out}: {n} clips, {voices} voices, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
