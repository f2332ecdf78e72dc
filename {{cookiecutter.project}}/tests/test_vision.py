"""The vision project: the ResNet's shapes, parameter count and skip connection; image loaders (sklearn digits, MNIST
IDX, class folders) and their one-line errors; splits that lose nothing; seeded augmentation that never touches
labels or evaluation data; the entry point under --debug, its resume, and fine-tuning a transformers ResNet."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from {{ cookiecutter.package }} import vision
from {{ cookiecutter.package }}.config import ConfigError, parse_config
from {{ cookiecutter.package }}.config.vision import ImageAugmentConfig, ResNetConfig, VisionConfig
from {{ cookiecutter.package }}.data import images
from {{ cookiecutter.package }}.data.batches import ExampleBatches, iter_batches
from {{ cookiecutter.package }}.data.image_augment import augment_images, make_augment
from {{ cookiecutter.package }}.model.resnet import BasicBlock, ResNet

TINY = ResNetConfig(widths=[8, 16], blocks=[1, 1])  # the debug profile's model
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---- the model -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [8, 28])
def test_resnet_output_shape_for_digit_sizes(size):
    model = ResNet(TINY, num_classes=10).eval()
    out = model(torch.rand(3, 1, size, size), labels=torch.tensor([0, 4, 9]))
    assert out.logits.shape == (3, 10)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_resnet_parameter_count_by_hand():
    conv3, bn = lambda i, o: 9 * i * o, lambda c: 2 * c  # noqa: E731  (bias-free 3x3 convs; BN scale + shift)
    stem = conv3(1, 8) + bn(8)
    block1 = 2 * conv3(8, 8) + 2 * bn(8)  # identity shortcut
    block2 = conv3(8, 16) + conv3(16, 16) + 2 * bn(16) + 8 * 16 + bn(16)  # 1x1 projection shortcut (stride 2)
    head = 16 * 10 + 10
    assert ResNet(TINY, num_classes=10).num_params() == stem + block1 + block2 + head == 5122


def test_flops_per_example_by_hand():
    # multiply-adds per output pixel x output pixels: stem and block 1 at 8x8, block 2 (stride 2) at 4x4, then fc
    stem, block1 = 9 * 1 * 8 * 64, 2 * 9 * 8 * 8 * 64
    block2 = (9 * 8 * 16 + 9 * 16 * 16 + 8 * 16) * 16
    macs = stem + block1 + block2 + 16 * 10
    assert ResNet(TINY, num_classes=10).flops_per_example(8, 8) == 3 * 2 * macs


def test_residual_block_gradient_flows_through_the_skip():
    block = BasicBlock(4, 4).eval()
    torch.nn.init.zeros_(block.conv2.weight)  # the residual branch is now constant: no gradient through it
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    block(x).sum().backward()
    assert torch.equal(x.grad, (x > 0).float())  # relu(0 + x): all of the gradient came through the skip
    block.shortcut = torch.nn.Conv2d(4, 4, 1, bias=False)  # cut the skip connection: nothing reaches x any more
    torch.nn.init.zeros_(block.shortcut.weight)
    x.grad = None
    block(x).sum().backward()
    assert not x.grad.any()


def test_saved_model_reproduces_the_test_accuracy(debug_run):
    run_dir, result = debug_run
    model = ResNet(TINY, num_classes=10)
    model.load_state_dict(load_file(run_dir / vision.MODEL_FILE))  # normalisation buffers included
    splits = vision.load_splits(parse_config(VisionConfig, ["--debug"])[0])
    with torch.no_grad():
        predictions = model.eval()(splits.test.images).logits.argmax(-1)
    assert float((predictions == splits.test.labels).float().mean()) == pytest.approx(result["eval"]["accuracy"])


# ---- loaders ---------------------------------------------------------------------------------------------------------
def write_idx(path: Path, array: torch.Tensor, magic_type: int = 0x08) -> Path:
    """The real IDX format: 0, 0, type, ndim, big-endian int32 sizes, then the data (gzip when the name ends .gz)."""
    data = array.to(torch.uint8).numpy()
    raw = bytes([0, 0, magic_type, data.ndim]) + struct.pack(f">{data.ndim}I", *data.shape) + data.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.fixture
def mnist_dir(tmp_path):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    pixels = torch.randint(0, 256, (40, 28, 28), generator=gen)
    pixels[7] = pixels[3]  # one exact duplicate (same label: 7 % 4 == 3)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", pixels)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", pixels[:8])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:8])
    return tmp_path


def test_mnist_idx_loader_reads_the_real_format(mnist_dir):
    pool, test = images.load_images(str(mnist_dir))
    assert pool.images.shape == (40, 1, 28, 28) and test.images.shape == (8, 1, 28, 28)
    assert pool.names == ["0", "1", "2", "3"] and pool.labels.tolist() == (torch.arange(40) % 4).tolist()
    raw = gzip.decompress((mnist_dir / "train-images-idx3-ubyte.gz").read_bytes())
    assert pool.images[5, 0, 0, 0] * 255 == pytest.approx(raw[16 + 5 * 784])  # header: 4 magic + 3 x 4 sizes
    deduped, dropped = images.dedupe(pool)
    assert dropped == 1 and len(deduped) == 39


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "train-labels-idx1-ubyte.gz").unlink(), "missing labels file"),
        (lambda d: write_idx(d / "train-labels-idx1-ubyte.gz", torch.zeros(39)), "40 images but"),
        (lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x08\x03\x00\x00")), "magic"),
        (lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all"), "unreadable"),
        (lambda d: (d / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 9])), "truncated"),
    ],
    ids=["missing-labels", "count-mismatch", "wrong-magic", "unreadable", "truncated"],
)
def test_bad_idx_files_fail_with_one_line(mnist_dir, damage, message):
    damage(mnist_dir)
    with pytest.raises(ConfigError, match=message) as err:
        images.load_images(str(mnist_dir))
    assert "\n" not in str(err.value)


@pytest.fixture
def folder_dir(tmp_path):
    from PIL import Image

    for label in ("circle", "cross"):
        (tmp_path / label).mkdir()
        for i in range(6):
            shade = 40 * i if label == "cross" else 255 - 40 * i
            Image.new("L", (12, 12), color=shade).save(tmp_path / label / f"{i}.png")
    return tmp_path


def test_class_folders_load_with_their_labels(folder_dir):
    pool, test = images.load_images(str(folder_dir))
    assert test is None and pool.names == ["circle", "cross"]
    assert pool.images.shape == (12, 1, 12, 12) and pool.labels.tolist() == [0] * 6 + [1] * 6
    assert images.load_images(str(folder_dir), image_size=8)[0].images.shape == (12, 1, 8, 8)
    assert images.load_images(str(folder_dir), color=True)[0].images.shape == (12, 3, 12, 12)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "cross" / "9.png").write_bytes(b"garbage"), r"cross/9.png: unreadable image"),
        (lambda d: (d / "stray.png").write_bytes((d / "cross" / "0.png").read_bytes()), "stray.png: missing label"),
    ],
    ids=["unreadable", "no-class-folder"],
)
def test_bad_image_folders_fail_with_one_line(folder_dir, damage, message):
    damage(folder_dir)
    with pytest.raises(ConfigError, match=message) as err:
        images.load_images(str(folder_dir))
    assert "\n" not in str(err.value)


def test_bad_data_path_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vision.main(["--debug", "--out_dir", str(tmp_path), "--data.path", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.path") and "\n" not in err


def test_splits_are_stratified_seeded_and_lose_nothing():
    pool, _ = images.load_images(None)
    a = images.split(pool, None, 0.15, 0.15, seed=1)
    b = images.split(pool, None, 0.15, 0.15, seed=1)
    assert len(a.train) + len(a.val) + len(a.test) == len(pool) == 1797
    assert torch.equal(a.test.images, b.test.images)  # seeded
    keys = [{row.numpy().tobytes() for row in part.images} for part in (a.train, a.val, a.test)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])  # disjoint (no duplicates in digits)
    for part in (a.val, a.test):  # every class in every split, in proportion
        counts = torch.bincount(part.labels, minlength=10)
        assert counts.min() >= 0.8 * counts.max()


# ---- augmentation ----------------------------------------------------------------------------------------------------
def _batch(n=16):
    pool, _ = images.load_images(None)
    return images.image_collate(images.as_examples(pool.subset(torch.arange(n))))


def test_augmentation_is_seeded_keeps_labels_and_moves_pixels():
    augment = make_augment(ImageAugmentConfig(elastic=0.05, shear=5.0))
    batch = _batch()
    out = augment(batch, torch.Generator().manual_seed(3))
    again = augment(batch, torch.Generator().manual_seed(3))
    other = augment(batch, torch.Generator().manual_seed(4))
    assert torch.equal(out["labels"], batch["labels"]) and out["pixel_values"].shape == batch["pixel_values"].shape
    assert torch.equal(out["pixel_values"], again["pixel_values"])
    assert not torch.allclose(out["pixel_values"], other["pixel_values"])
    assert (out["pixel_values"] - batch["pixel_values"]).abs().mean() > 0.02
    assert out["pixel_values"].min() >= 0 and out["pixel_values"].max() <= 1  # bilinear + zero padding stays in range


def test_identity_transform_reproduces_the_image_and_off_means_no_hook():
    batch = _batch()["pixel_values"]
    identity = ImageAugmentConfig(shift=0, rotate=0, scale=0, shear=0, elastic=0)
    torch.testing.assert_close(augment_images(batch, identity, torch.Generator()), batch, atol=1e-6, rtol=0)
    assert make_augment(identity) is None and make_augment(ImageAugmentConfig(enabled=False)) is None


def test_training_batches_are_augmented_evaluation_batches_never():
    pool, _ = images.load_images(None)
    items = images.as_examples(pool.subset(torch.arange(32)))
    train = ExampleBatches(items, 8, images.image_collate, shuffle=False, augment=make_augment(ImageAugmentConfig()))
    first = train.next_batch()
    assert not torch.equal(first["pixel_values"], pool.images[:8])
    assert torch.equal(first["labels"], pool.labels[:8])
    evaluated = torch.cat([b["pixel_values"] for b in iter_batches(items, 8, images.image_collate)])
    assert torch.equal(evaluated, pool.images[:32])


def test_the_entry_point_evaluates_unaugmented_images(tmp_path, monkeypatch):
    """A marker augmentation (every pixel -1) must reach training and never the validation / test evaluation."""
    seen = {"train": 0, "eval": 0}

    def marker(batch, generator):
        seen["train"] += 1
        return {**batch, "pixel_values": torch.full_like(batch["pixel_values"], -1.0)}

    real_evaluate = vision.evaluate_classifier

    def checked_evaluate(model, batches, *args, **kwargs):
        def check(stream):
            for batch in stream:
                assert batch["pixel_values"].min() >= 0, "an evaluation batch was augmented"
                seen["eval"] += 1
                yield batch

        return real_evaluate(model, check(batches), *args, **kwargs)

    monkeypatch.setattr(vision, "make_augment", lambda cfg: marker)
    monkeypatch.setattr(vision, "evaluate_classifier", checked_evaluate)
    vision.run(*parse_config(VisionConfig, ["--debug", "--out_dir", str(tmp_path), "--train.max_steps", "3"]))
    assert seen["train"] == 3 and seen["eval"] > 6


# ---- the entry point -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision")
    cfg, dbg = parse_config(VisionConfig, ["--debug", "--out_dir", str(out)])
    return out / cfg.name, vision.run(cfg, dbg)


def test_debug_profile_runs_end_to_end(debug_run):
    run_dir, result = debug_run
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["steps"] == 20 and saved["data"] == {"train": 1257, "val": 270, "test": 270}
    ev = saved["eval"]
    assert ev["num_examples"] == 270 and len(ev["confusion_matrix"]) == 10 and set(ev["per_class"]) == set("0123456789")
    assert {"accuracy", "macro_precision", "macro_recall", "macro_f1", "loss"} <= set(ev)
    assert json.loads((run_dir / "label_map.json").read_text())["labels"] == list("0123456789")
    assert (run_dir / "checkpoints" / "step-000020").is_dir() and (run_dir / "tb").is_dir()


@pytest.mark.slow
def test_cli_debug_run_in_a_subprocess(tmp_path, subprocess_env, package_name):
    argv = [sys.executable, "-m", f"{package_name}.vision", "--config", str(CONFIGS / "vision.yaml"), "--debug"]
    start = time.monotonic()
    done = subprocess.run([*argv, "--out_dir", str(tmp_path)], env=subprocess_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done: step 20" in done.stdout and "ex/s" in done.stdout
    assert (tmp_path / "vision-debug" / "metrics.json").is_file()
    assert time.monotonic() - start < 60  # seconds on one core; the bound leaves room for a loaded CI machine


def test_resume_with_other_classes_fails_with_one_line(debug_run, folder_dir):
    run_dir, _ = debug_run
    argv = ["--debug", "--out_dir", str(run_dir.parent), "--data.path", str(folder_dir), "--train.resume", "auto"]
    with pytest.raises(ConfigError, match=r"checkpoint labels \['0', .*differ from the data's labels \['circle'"):
        vision.run(*parse_config(VisionConfig, argv))


def test_resume_is_exact(tmp_path):
    """4 steps straight == 2 steps, then a resume for 2 more (augmentation on: its draws come from the position)."""
    args = ["--debug", "--train.max_steps", "4", "--train.save_every", "2", "--train.keep_checkpoints", "0"]
    straight = parse_config(VisionConfig, [*args, "--out_dir", str(tmp_path / "a")])
    vision.run(*straight)
    resumed = parse_config(VisionConfig, [*args, "--out_dir", str(tmp_path / "b")])
    vision.run(*resumed)
    run_b = tmp_path / "b" / resumed[0].name
    import shutil

    shutil.rmtree(run_b / "checkpoints" / "step-000004")  # as if killed after step 2
    vision.run(*parse_config(VisionConfig, [*args, "--out_dir", str(tmp_path / "b"), "--train.resume", "auto"]))
    a = load_file(tmp_path / "a" / straight[0].name / vision.MODEL_FILE)
    b = load_file(run_b / vision.MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- fine-tuning a transformers ResNet -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_resnet_dir(tmp_path_factory):
    """A randomly initialised transformers ResNet (no download), saved like a hub checkpoint."""
    from transformers import ResNetConfig as HFResNetConfig
    from transformers import ResNetForImageClassification

    torch.manual_seed(0)
    config = HFResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5)
    path = tmp_path_factory.mktemp("hf-resnet")
    ResNetForImageClassification(config).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("tune", ["lora", "head"])
def test_fine_tunes_a_transformers_resnet(tmp_path, hf_resnet_dir, tune):
    from transformers import ResNetForImageClassification

    argv = ["--debug", "--out_dir", str(tmp_path), "--base_model", str(hf_resnet_dir), "--tune", tune]
    cfg, dbg = parse_config(VisionConfig, [*argv, "--base_input_size", "32", "--train.max_steps", "3"])
    result = vision.run(cfg, dbg)
    assert result["trainable_params"] < result["total_params"]
    saved = ResNetForImageClassification.from_pretrained(str(tmp_path / cfg.name / vision.MERGED_DIR))
    assert saved.config.num_labels == 10 and saved.config.id2label[3] == "3"  # a new 10-way head


def test_lora_on_the_backbone_equals_peft_merge(hf_resnet_dir):
    from {{ cookiecutter.package }}.config import LoraSettings
    from {{ cookiecutter.package }}.model.pretrained_resnet import (
        PretrainedImageClassifier,
        load_backbone,
        prepare_tuning,
    )

    labels = list("abc")
    peft_model = prepare_tuning(load_backbone(str(hf_resnet_dir), labels), "lora", LoraSettings(r=4, dropout=0.0))
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith("convolution.lora_A")]
    assert len(adapted) == 6  # stem + 2 convs in each of the 2 blocks + 1 projection shortcut
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0 (a no-op adapter): make the comparison mean something
            torch.nn.init.normal_(param, std=0.1)
    model = PretrainedImageClassifier(peft_model, input_size=32, frozen_norm=True).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        adapter_logits = model(x).logits
        merged = PretrainedImageClassifier(peft_model.merge_and_unload(), input_size=32).eval()
        torch.testing.assert_close(merged(x).logits, adapter_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapter_logits, torch.zeros_like(adapter_logits))


def test_unreachable_hub_id_fails_with_one_line_naming_the_download(monkeypatch):
    import huggingface_hub.constants

    from {{ cookiecutter.package }}.model.pretrained_resnet import ALIASES, load_backbone

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying
    with pytest.raises(ConfigError, match=r"hf download no-such-org/resnet-x --local-dir resnet-x") as err:
        load_backbone("no-such-org/resnet-x", ["a", "b"])
    assert "\n" not in str(err.value)
    assert ALIASES["resnet18"] == "microsoft/resnet-18" and ALIASES["resnet50"] == "microsoft/resnet-50"


def test_early_stopping_ends_with_the_best_checkpoint_and_exports_it(tmp_path):
    """The first evaluation is the best and no later one beats it by 1e9: the run stops at the second; the final
    validation score and model.safetensors are the first evaluation's checkpoint."""
    stop = ["--train.early_stopping.enabled", "true", "--train.early_stopping.patience", "1",
            "--train.early_stopping.min_delta", "1e9", "--train.eval_every", "4"]  # fmt: skip
    cfg, dbg = parse_config(VisionConfig, ["--debug", "--out_dir", str(tmp_path), *stop])
    result = vision.run(cfg, dbg)
    run_dir = tmp_path / cfg.name
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and result["steps"] == 8
    assert result["weights"] == "of the best checkpoint, step 4 (early stopping)"
    assert result["val"]["accuracy"] == evals[0]["eval_accuracy"]
    assert result["val"]["loss"] == pytest.approx(evals[0]["eval_loss"], abs=1e-6)
    saved = load_file(run_dir / vision.MODEL_FILE)
    best = load_file(run_dir / "checkpoints" / "step-000004" / "model.safetensors")
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)


@pytest.mark.slow
def test_tune_debug_study_of_two_trials(tmp_path, monkeypatch):
    from {{ cookiecutter.package }} import tune

    shutil.copytree(CONFIGS, tmp_path / "configs")  # the space names its recipe relative to the working directory
    monkeypatch.chdir(tmp_path)
    study = tune.run(*parse_config(tune.TuneConfig, ["--space", "configs/tune/vision.yaml", "--debug"]))
    assert len(study.trials) == 2 and all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    study_dir = tmp_path / "runs" / "tune-vision-debug"
    best, _ = parse_config(VisionConfig, ["--config", str(study_dir / "best.yaml")])
    params = study.best_params
    assert (best.optim.lr, best.train.batch_size) == (params["optim.lr"], params["train.batch_size"])
    assert best.train.early_stopping.enabled and best.train.early_stopping.metric == "accuracy"
    for t in study.trials:  # normal runs: the trial's values in its config.yaml, its own TensorBoard
        run_dir = study_dir / "trials" / t.user_attrs["run"]
        cfg, _ = parse_config(VisionConfig, ["--config", str(run_dir / "config.yaml")])
        assert cfg.optim.weight_decay == t.params["optim.weight_decay"] and (run_dir / "tb").is_dir()
    assert {p.name for p in (study_dir / "plots").glob("*.png")} >= {"history.png", "parallel.png"}
