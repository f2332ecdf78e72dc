"""predict on the vision project's classifiers: the held-out test digits written as PNGs score the run's own test
accuracy with the probabilities of the training's evaluation path, images of another size and colour are converted,
a fine-tuned transformers ResNet predicts too, and an unreadable image ends in one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import test_vision
from {{ cookiecutter.package }} import vision
from {{ cookiecutter.package }}.classifiers import load_classifier
from {{ cookiecutter.package }}.config import parse_config
from {{ cookiecutter.package }}.config.vision import VisionConfig
from {{ cookiecutter.package }}.data.images import write_images

# test_vision.py's module-scoped fixture, shared by name. An `import` line, not `from test_vision import ...`: its
# place among the imports then does not depend on the package's name, which the import sort would compare it with.
hf_resnet_dir = test_vision.hf_resnet_dir


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    """The --debug ResNet trained from scratch, and the test split it was scored on."""
    out = tmp_path_factory.mktemp("predict-vision")
    cfg, dbg = parse_config(VisionConfig, ["--debug", "--out_dir", str(out), "--train.logger", "none"])
    vision.run(cfg, dbg)
    return out / cfg.name, vision.load_splits(cfg).test


def test_held_out_pngs_score_the_runs_test_accuracy(vision_run, tmp_path, predict_json):
    run_dir, test = vision_run
    write_images(test, tmp_path / "test")
    rows = predict_json(run_dir, tmp_path / "test", "--batch_size", "64", "--device", "cpu")  # 270 = 4 x 64 + 14
    assert len(rows) == len(test)
    accuracy = sum(r["label"] == r["gold"] for r in rows.values()) / len(rows)
    assert accuracy == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["eval"]["accuracy"])
    classifier = load_classifier(run_dir, torch.device("cpu"))  # the in-memory test images, as training scored them
    expected = classifier.probabilities(list(test.images))
    files = sorted(rows, key=lambda f: Path(f).name)  # write_images names a file by its index in the split
    got = torch.tensor([list(rows[f]["probabilities"].values()) for f in files])
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)  # PNGs hold 8 bits, the digits 16 grey levels


def test_images_of_another_size_and_colour_are_converted(vision_run, tmp_path, predict_cli):
    run_dir, test = vision_run
    digit = (test.images[0, 0].numpy() * 255).round().astype(np.uint8)
    big = Image.fromarray(np.kron(digit, np.ones((4, 4), dtype=np.uint8))).convert("RGB")  # 32x32 RGB
    big.save(tmp_path / "big.png")
    classifier = load_classifier(run_dir, torch.device("cpu"))
    assert tuple(classifier.read_file(tmp_path / "big.png").shape) == (1, 8, 8)
    code, lines, err = predict_cli(run_dir, tmp_path / "big.png")
    assert code == 0 and len(lines) == 1 and len(lines[0].split("\t")[1].split()) == 10, err


def test_a_fine_tuned_transformers_resnet_predicts_its_test_accuracy(tmp_path, hf_resnet_dir, predict_json):  # noqa: F811
    argv = ["--debug", "--out_dir", str(tmp_path), "--base_model", str(hf_resnet_dir), "--tune", "lora"]
    cfg, dbg = parse_config(VisionConfig, [*argv, "--base_input_size", "32", "--train.max_steps", "3"])
    result = vision.run(cfg, dbg)
    write_images(vision.load_splits(cfg).test, tmp_path / "test")
    rows = predict_json(tmp_path / cfg.name, tmp_path / "test")
    accuracy = sum(r["label"] == r["gold"] for r in rows.values()) / len(rows)
    assert accuracy == pytest.approx(result["eval"]["accuracy"], abs=1.5 / len(rows))  # 8-bit PNGs: one flip at most


def test_an_unreadable_image_exits_2_with_one_line(vision_run, tmp_path, predict_cli):
    run_dir, _ = vision_run
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    code, out, err = predict_cli(run_dir, tmp_path / "broken.png")
    assert code == 2 and not out and len(err.splitlines()) == 1
    assert err.startswith("error: ") and "broken.png: unreadable image" in err
