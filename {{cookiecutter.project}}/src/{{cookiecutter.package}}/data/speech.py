"""Spoken-command data: the builtin espeak-ng set, or Google Speech Commands v2 from a directory.

Both come out as :class:`SpeechData`: float32 mono clips at ``sample_rate`` (each at most ``clip_samples`` long,
shorter ones are padded by :func:`speech_collate`), integer labels, and train/val/test splits that never share a
speaker, so the test score measures how well the model hears a voice it never heard.

- Builtin (``data/builtin/speech_commands.npz``, rebuilt by ``scripts/build_speech_commands.py``): ten words said by
  espeak-ng voices with random accents, speeds and pitches; 8-bit mu-law at 8 kHz with a manifest. The split is
  stored in the file: whole voices are held out for validation and test.
- Speech Commands v2 (``data.path``): ``<word>/<speaker>_nohash_<n>.wav`` (16 kHz PCM), ``validation_list.txt`` and
  ``testing_list.txt`` (paths relative to the root; the dataset assigns speakers to splits by a hash of their id),
  everything else is training data; ``_background_noise_/*.wav`` feed the noise augmentation. Only ``words`` are
  read (the other word folders are counted and skipped: say ``--data.words`` to use them).

Bad input is one line (:class:`~.wav.AudioError` or ``ValueError``) naming the file; nothing is dropped silently:
the loader counts every clip it read into exactly one split.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config.speech import SPEECH_WORDS
from .wav import mulaw_decode, read_wav, resample

WORDS = SPEECH_WORDS
SPLITS = ("train", "val", "test")
BUILTIN_SPEECH = Path(__file__).resolve().with_name("builtin") / "speech_commands.npz"
NOISE_DIR = "_background_noise_"
SPLIT_LISTS = {"val": "validation_list.txt", "test": "testing_list.txt"}


@dataclass
class Clip:
    audio: np.ndarray  # float32 [N], N <= clip_samples
    label: int
    source: str  # file or manifest entry, for error messages and inspection


@dataclass
class SpeechData:
    labels: list[str]
    sample_rate: int
    train: list[Clip]
    val: list[Clip]
    test: list[Clip]
    noise: list[np.ndarray] = field(default_factory=list)  # background recordings (Speech Commands only)

    def counts(self) -> str:
        return f"{len(self.train)} train / {len(self.val)} val / {len(self.test)} test clips"


def load_speech(path: str | None, sample_rate: int, clip_seconds: float, words: Sequence[str] = WORDS) -> SpeechData:
    """The builtin set (``path`` None) or Speech Commands v2 at ``path``. Raises ValueError (one line)."""
    clip_samples = round(sample_rate * clip_seconds)
    if path is None:
        return load_builtin(sample_rate, clip_samples, words)
    return load_speech_commands(Path(path), sample_rate, clip_samples, words)


# ----------------------------------------------------------------------------------------------------------------------
# Builtin set
# ----------------------------------------------------------------------------------------------------------------------
def read_manifest(path: Path = BUILTIN_SPEECH) -> dict[str, np.ndarray]:
    """Every array of the .npz (audio codes, offsets and the per-clip manifest), read without pickle."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_builtin(sample_rate: int, clip_samples: int, words: Sequence[str] = WORDS) -> SpeechData:
    """The clips of ``words`` (label = position in ``words``), decoded and resampled to ``sample_rate``."""
    z = read_manifest()
    stored, known = int(z["sample_rate"]), [str(w) for w in z["words"]]
    if sample_rate > stored:
        raise ValueError(f"{BUILTIN_SPEECH.name} is {stored} Hz: data.sample_rate={sample_rate} must be <= {stored}")
    unknown = [w for w in words if w not in known]
    if unknown:
        raise ValueError(f"{BUILTIN_SPEECH.name} has no clips of {', '.join(unknown)} (its words: {', '.join(known)})")
    label_of = {known.index(w): i for i, w in enumerate(words)}
    splits: dict[str, list[Clip]] = {s: [] for s in SPLITS}
    bounds, voices = z["offsets"], z["voices"]
    for i, (word, voice, split) in enumerate(zip(z["word"], z["voice"], z["split"], strict=True)):
        if int(word) in label_of:
            audio = resample(mulaw_decode(z["audio"][bounds[i] : bounds[i + 1]]), stored, sample_rate)[:clip_samples]
            splits[SPLITS[split]].append(
                Clip(audio, label_of[int(word)], f"{BUILTIN_SPEECH.name}[{i}] {voices[voice]}")
            )
    return SpeechData(list(words), sample_rate, **splits)


# ----------------------------------------------------------------------------------------------------------------------
# Google Speech Commands v2
# ----------------------------------------------------------------------------------------------------------------------
def _read_list(root: Path, name: str) -> set[str]:
    """The relative paths of a split list; every entry must exist (a missing file would silently move data)."""
    path = root / name
    if not path.is_file():
        raise ValueError(f"{root}: {name} not found: is this a Speech Commands v2 directory?")
    entries = {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    missing = sorted(e for e in entries if not (root / e).is_file())
    if missing:
        raise ValueError(f"{path}: {len(missing)} listed files do not exist, e.g. {missing[0]}")
    return entries


def load_speech_commands(root: Path, sample_rate: int, clip_samples: int, words: Sequence[str]) -> SpeechData:
    if not root.is_dir():
        raise ValueError(f"data.path={root} is not a directory")
    held_out = {split: _read_list(root, name) for split, name in SPLIT_LISTS.items()}
    absent = [w for w in words if not (root / w).is_dir()]
    if absent:
        raise ValueError(f"{root}: no folder for label(s) {', '.join(absent)} (data.words names the folders to read)")
    splits: dict[str, list[Clip]] = {s: [] for s in SPLITS}
    for label, word in enumerate(words):
        for wav in sorted((root / word).glob("*.wav")):
            rel = f"{word}/{wav.name}"
            split = next((s for s, entries in held_out.items() if rel in entries), "train")
            splits[split].append(Clip(read_wav(wav, sample_rate)[:clip_samples], label, rel))
    skipped = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in words and p.name != NOISE_DIR)
    if skipped:
        print(f"notice: {len(skipped)} word folders not in data.words skipped: {', '.join(skipped)}", flush=True)
    noise = [read_wav(p, sample_rate) for p in sorted((root / NOISE_DIR).glob("*.wav"))]
    return SpeechData(list(words), sample_rate, **splits, noise=noise)


# ----------------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------------
def place(audio: np.ndarray, clip_samples: int) -> np.ndarray:
    """The clip centred in ``clip_samples`` of silence (the training shift moves it; evaluation keeps it here)."""
    out = np.zeros(clip_samples, dtype=np.float32)
    start = (clip_samples - len(audio)) // 2
    out[start : start + len(audio)] = audio
    return out


def collate_clips(clip_samples: int, clips: list[Clip]) -> dict[str, Tensor]:
    """[Clip] -> {"input_values": float [B, clip_samples], "labels": long [B]} (HF's name for raw audio)."""
    audio = np.stack([place(c.audio, clip_samples) for c in clips])
    return {"input_values": torch.from_numpy(audio), "labels": torch.tensor([c.label for c in clips], dtype=torch.long)}


def speech_collate(clip_samples: int) -> Callable[[list[Clip]], dict[str, Tensor]]:
    """:func:`collate_clips` for one clip length; a partial, so DataLoader workers can pickle it (spawn)."""
    return functools.partial(collate_clips, clip_samples)
