"""Handwritten-digit recognition: ``python -m <package>.vision --config configs/vision.yaml [--options]``.

With no options it trains the ResNet of model/resnet.py from scratch on scikit-learn's 1,797 8x8 digits (offline):
stratified 70/15/15 train/val/test split, exact duplicates dropped, on-the-fly augmentation of the training batches
(data/image_augment.py), evaluation on the validation set every ``train.eval_every`` steps and a final evaluation on
the test set (accuracy, macro and per-class precision/recall/F1, confusion matrix).

    python -m <package>.vision --config configs/vision.yaml                       # ~0.99 test accuracy, < 1 min CPU
    python -m <package>.vision --config configs/vision.yaml --debug               # seconds
    python -m <package>.vision --config configs/vision.yaml --data.path ~/mnist   # MNIST IDX files, or class folders
    python -m <package>.vision --config configs/vision.yaml --base_model resnet18 --tune lora   # pretrained backbone

Training is pretrain's: the same ``fit()`` / ``train_step`` (its breakpoint line), checkpoints and
``--train.resume auto``, TensorBoard, ``--debug``, ``--debugpy``, ``--break-on-nonfinite``.

Run directory ``<out_dir>/<name>/``: ``config.yaml``, ``label_map.json``, ``checkpoints/``, ``tb/``,
``metrics.jsonl`` (per step), ``metrics.json`` (final: ``eval`` = the test set, ``val`` = the validation set), and
the model: ``model.safetensors`` (the from-scratch ResNet, input normalisation included) or ``hf/`` (a fine-tuned
transformers ResNet, LoRA merged in; it expects the input adaptation of model/pretrained_resnet.py).

Exit codes: 0 done, 2 bad input (config, data, model path, existing run), 1 non-finite loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .cli import run_cli
from .config import ConfigError, DebugConfig
from .config.vision import VisionConfig
from .data import images
from .data.batches import ExampleBatches, iter_batches
from .data.classify import LabelMap
from .data.image_augment import describe, make_augment
from .lora import count_parameters
from .metrics import CLASSIFIER_METRICS, scalar_metrics
from .runtime import RunContext, check_resume_labels, training_run
from .train.distributed import barrier, resolve_device, unwrap
from .train.logger import history_result, report_final
from .train.loop import Job, evaluate_classifier, fit

MODEL_FILE = "model.safetensors"
MERGED_DIR = "hf"


def load_splits(cfg: VisionConfig) -> images.Splits:
    """Read, clean and split the images; every problem is a ConfigError before the model is built."""
    d = cfg.data
    pool, test = images.load_images(d.path, d.image_size, d.color)
    if d.dedupe:
        pool, dropped = images.dedupe(pool)
        if dropped:
            print(f"notice: {dropped} exact duplicate images dropped from {pool.source} (data.dedupe)")
    splits = images.split(pool, test, d.val_fraction, d.test_fraction, cfg.train.seed, d.max_examples)
    shape = "x".join(str(s) for s in splits.train.images.shape[1:])
    print(
        f"data: {pool.source}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images "
        f"of {shape}, {len(pool.names)} classes"
    )
    return splits


def build_model(cfg: VisionConfig, splits: images.Splits) -> nn.Module:
    """The from-scratch ResNet (normalised with the training images' statistics) or the adapted pretrained one."""
    names, channels = splits.train.names, splits.train.images.shape[1]
    if cfg.base_model is None:
        from .model.resnet import ResNet

        model = ResNet(cfg.model, len(names), in_channels=channels)
        model.set_normalization(*images.channel_stats(splits.train.images))
        return model
    from .model.pretrained_resnet import PretrainedImageClassifier, load_backbone, prepare_tuning

    backbone = prepare_tuning(load_backbone(cfg.base_model, names), cfg.tune, cfg.lora)
    return PretrainedImageClassifier(backbone, cfg.base_input_size, frozen_norm=cfg.tune != "full")


def reported_metrics(cfg: VisionConfig) -> tuple[str, ...]:
    """What every evaluation reports (train.early_stopping.metric and tune's objective name one)."""
    return CLASSIFIER_METRICS


def flops_per_example(model: nn.Module, size: tuple[int, int]) -> float | None:
    """Training FLOPs per image of the from-scratch ResNet; None (no MFU) for a pretrained backbone."""
    count = getattr(model, "flops_per_example", None)
    return count(*size) if count is not None else None


def save_model(model: nn.Module, run_dir: Path) -> Path:
    """The trained weights in the run directory: see the module docstring."""
    from safetensors.torch import save_file

    if hasattr(model, "input_size"):  # PretrainedImageClassifier
        inner = model.model
        merged = inner.merge_and_unload() if hasattr(inner, "peft_config") else inner  # last use: merging mutates
        merged.save_pretrained(str(run_dir / MERGED_DIR))
        return run_dir / MERGED_DIR
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(run_dir / MODEL_FILE))
    return run_dir / MODEL_FILE


def finish(
    cfg: VisionConfig, run_dir: Path, model: nn.Module, splits: images.Splits, history: list[dict], autocast
) -> dict:
    """Final evaluation (validation and test sets, all of them), metrics.json, TensorBoard, the model."""
    raw, names = unwrap(model), splits.train.names
    device = next(raw.parameters()).device
    trainable, total = count_parameters(raw)
    bs = cfg.train.batch_size
    raw.eval()
    with autocast:  # the training run's, as for fit's evaluations
        result: dict[str, Any] = {
            "task": "vision",
            "base_model": cfg.base_model,
            **history_result(history),
            "trainable_params": trainable,
            "total_params": total,
            "augmentation": describe(cfg.augment),
            "data": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
            "val": evaluate_classifier(
                raw, iter_batches(images.as_examples(splits.val), bs, images.image_collate), names, device
            ),
            "eval": evaluate_classifier(
                raw, iter_batches(images.as_examples(splits.test), bs, images.image_collate), names, device
            ),
        }
    report_final(run_dir, result, cfg.train.logger)
    print(f"model written to {save_model(raw, run_dir)}", flush=True)
    return result


def train(cfg: VisionConfig, run: RunContext, splits: images.Splits) -> tuple[nn.Module, list[dict]]:
    """Build, wrap and fit the model: (the model as it trained, fit()'s per-step history)."""
    info, names = run.info, splits.train.names
    model = build_model(cfg, splits).to(info.device)
    trainable, total = count_parameters(model)
    if info.is_main:
        what = cfg.base_model or "ResNet from scratch"
        print(f"model: {what}  trainable {trainable:,} / {total:,} parameters on {info.device}", flush=True)
        print(describe(cfg.augment), flush=True)
    model = run.wrap(model, cfg.train.compile)
    run.save_config(cfg)
    if info.is_main:
        LabelMap(names).save(run.run_dir)

    from .debug import effective_num_workers

    bs = cfg.train.batch_size
    source = ExampleBatches(
        images.as_examples(splits.train),
        bs,
        images.image_collate,
        seed=cfg.train.seed + info.rank,
        num_workers=effective_num_workers(cfg.data.num_workers),
        augment=make_augment(cfg.augment),  # training batches only
    )
    val = images.as_examples(splits.val)

    def evaluate(m: nn.Module, limit: int | None = cfg.train.eval_batches) -> dict[str, float]:
        batches = iter_batches(val, bs, images.image_collate)  # every train.eval_every steps, on train.eval_batches
        return scalar_metrics(evaluate_classifier(m, batches, names, info.device, limit))

    history = fit(
        model,
        source,
        cfg.train,
        run.run_dir,
        optim=cfg.optim,
        setup=run.setup,
        job=Job(
            evaluate=evaluate,
            validate=lambda m: evaluate(m, None),
            metrics=reported_metrics(cfg),
            config=cfg,
            extra_state={"labels": names},
            flops_per_item=flops_per_example(unwrap(model), splits.train.images.shape[-2:]),  # MFU, per image
            unit="ex",
        ),
    )
    return model, history


def run(cfg: VisionConfig, dbg: DebugConfig | None = None) -> dict:
    """Train and evaluate as configured; returns the final metrics (also in run_dir/metrics.json)."""
    dbg = dbg or DebugConfig()
    try:
        resolve_device(cfg.train.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    with training_run(cfg, dbg) as ctx:
        splits = load_splits(cfg)  # data errors before anything is written
        check_resume_labels(ctx.resume_from, splits.train.names)  # a resumed head must have the same classes
        ctx.start(cfg)
        model, history = train(cfg, ctx, splits)
        result: dict[str, Any] = {}
        if ctx.info.is_main:
            result = finish(cfg, ctx.run_dir, model, splits, history, ctx.setup.autocast)
        barrier()
        return result


def main(argv: list[str] | None = None) -> None:
    run_cli(VisionConfig, run, argv, prog=f"python -m {__package__}.vision")


if __name__ == "__main__":
    main()
