"""Rebuild samples/: a few held-out inputs per classifier, for ``predict`` and its IDE run configurations.

    python scripts/build_samples.py

Each sample comes from a split its training recipe never trains on (read with the training code) and is written by
the data module's own writer as ``samples/<kind>/<label>/<n>.<ext>`` (the folder is the label, to check by eye):
{%- if cookiecutter.extra_projects in ["vision", "both"] %}
- ``digits``: the first two test-split digits of each class (configs/vision.yaml's split), 8-bit PNGs;
{%- endif %}
{%- if cookiecutter.extra_projects in ["speech", "both"] %}
- ``speech``: the first clip of each word said by a test voice of the builtin set, 16-bit WAV at 8 kHz;
{%- endif %}
- ``text``: the first two validation passages of each genre of the builtin classification set.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from {{ cookiecutter.package }}.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
PER_CLASS = 2


def recipe(cls: type, name: str) -> Any:
    """The shipped recipe's config: its data and split settings are the training's."""
    return parse_config(cls, ["--config", str(ROOT / "configs" / f"{name}.yaml")])[0]


def first_per_class(items: Sequence[Any], label_of: Callable[[Any], Any], n: int) -> list[int]:
    """Indices of the first ``n`` items of each class, in their order."""
    seen: dict[Any, int] = defaultdict(int)
    keep = []
    for i, item in enumerate(items):
        label = label_of(item)
        if seen[label] < n:
            seen[label] += 1
            keep.append(i)
    return keep


def build_text(out: Path) -> None:
    from {{ cookiecutter.package }} import finetune
    from {{ cookiecutter.package }}.config.finetune import FinetuneConfig
    from {{ cookiecutter.package }}.data.classify import write_texts

    _, val, _ = finetune.read_classify(recipe(FinetuneConfig, "finetune-classify"))
    write_texts([val[i] for i in first_per_class(val, lambda row: row["label"], PER_CLASS)], out)
{%- if cookiecutter.extra_projects in ["vision", "both"] %}


def build_digits(out: Path) -> None:
    from {{ cookiecutter.package }} import vision
    from {{ cookiecutter.package }}.config.vision import VisionConfig
    from {{ cookiecutter.package }}.data.images import write_images

    test = vision.load_splits(recipe(VisionConfig, "vision")).test
    write_images(test.subset(first_per_class(test.labels.tolist(), int, PER_CLASS)), out)
{%- endif %}
{%- if cookiecutter.extra_projects in ["speech", "both"] %}


def build_speech(out: Path) -> None:
    from {{ cookiecutter.package }} import speech
    from {{ cookiecutter.package }}.config.speech import SpeechConfig
    from {{ cookiecutter.package }}.data.speech import write_clips

    cfg = recipe(SpeechConfig, "speech")
    data = speech.read_data(cfg)
    keep = first_per_class(data.test, lambda clip: clip.label, 1)
    write_clips([data.test[i] for i in keep], data.labels, out, cfg.data.sample_rate)
{%- endif %}


def main() -> None:
    builders = {"text": build_text}
{%- if cookiecutter.extra_projects in ["vision", "both"] %}
    builders["digits"] = build_digits
{%- endif %}
{%- if cookiecutter.extra_projects in ["speech", "both"] %}
    builders["speech"] = build_speech
{%- endif %}
    for name, build in builders.items():
        shutil.rmtree(SAMPLES / name, ignore_errors=True)
        build(SAMPLES / name)
        print(f"{SAMPLES / name}: {sum(1 for p in (SAMPLES / name).rglob('*') if p.is_file())} files")


if __name__ == "__main__":
    main()
