"""A spoken-command classifier of the speech project: the Conformer's final weights (``model.safetensors``; its log-mel
front end is part of the model). A new WAV file is read as Speech Commands files are in training (data/speech.py
``read_clip``: mono, resampled down to ``data.sample_rate``, a lower rate refused, cut to ``data.clip_seconds``) and
centred in the clip length as evaluation batches are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from ..config import ConfigError, load_config
from ..config.speech import SpeechConfig
from ..data.classify import LabelMap
from ..data.speech import read_clip, stack_clips
from ..data.wav import AudioError
from ..train.checkpoint import MODEL_FILE  # a from-scratch model's final weights: a checkpoint's file name
from ..train.state import save_model_weights
from . import Classifier, load_weights

AUDIO_SUFFIXES = (".wav",)


def save_model(model: nn.Module, run_dir: Path) -> Path:
    return save_model_weights(model, run_dir / MODEL_FILE, trainable_only=False)


def load(run_dir: Path) -> Classifier:
    from ..model.conformer import ConformerClassifier

    cfg = load_config(SpeechConfig, run_dir / "config.yaml")
    labels = LabelMap.load(run_dir).labels
    rate, clip_samples = cfg.data.sample_rate, cfg.data.clip_samples
    model = ConformerClassifier(cfg.model, cfg.features, rate, len(labels))

    def read_file(path: Path) -> np.ndarray:
        try:
            return read_clip(path, rate, clip_samples)
        except AudioError as err:
            raise ConfigError(str(err)) from err

    return Classifier(
        labels=labels,
        model=load_weights(model, run_dir / MODEL_FILE),
        read_file=read_file,
        collate=lambda clips: {"input_values": stack_clips(clips, clip_samples)},
        suffixes=AUDIO_SUFFIXES,
    )
