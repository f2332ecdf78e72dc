"""Spoken-command recognition with a Conformer: ``python -m <package>.speech --config configs/speech.yaml``.

With no options it trains on the builtin espeak-ng command set (ten words, 102 voices; validation and test voices
are never heard in training) and finally scores the held-out test voices. ``--data.path DIR`` reads Google Speech
Commands v2 instead (its own validation/testing lists). The model computes log-mel features from the waveform on its
device (model/conformer.py); augmentation (data/audio_augment.py) touches training batches only.

    python -m <package>.speech --config configs/speech.yaml                  # the builtin set, 1.5-3 min on 2 cores
    python -m <package>.speech --config configs/speech.yaml --debug          # tiny model, seconds
    python -m <package>.speech --config configs/speech.yaml --augment.enabled false
    python -m <package>.speech --config configs/speech.yaml --data.path ~/data/speech_commands_v0.02

Training is pretrain's: the same ``fit()`` / ``train_step`` (its breakpoint line), checkpoints, resume
(``--train.resume auto``), TensorBoard, ``--debug``, ``--debugpy``, ``--break-on-nonfinite``.

Run directory ``<out_dir>/<name>/``: ``config.yaml``, ``checkpoints/``, ``tb/``, ``metrics.jsonl`` (per step),
``label_map.json``, ``metrics.json`` (``eval``: the held-out test voices; ``val``: the validation voices;
``eval_noisy``: the test voices in coloured noise at ``noisy_test_snr_db``; each with accuracy, macro and per-class
precision/recall/F1 and the confusion matrix).

Exit codes: 0 done, 2 bad input (config, audio files, existing run), 1 non-finite loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .cli import run_cli
from .config import ConfigError, DebugConfig
from .config.speech import SpeechConfig
from .data.batches import ExampleBatches, iter_batches
from .data.classify import LabelMap
from .data.speech import SpeechData, load_speech, speech_collate
from .metrics import CLASSIFIER_METRICS, scalar_metrics
from .runtime import check_resume_labels, training_run
from .train.distributed import barrier, unwrap
from .train.logger import history_result, report_final
from .train.loop import Job, evaluate_classifier, fit


def read_data(cfg: SpeechConfig) -> SpeechData:
    """The clips, or one line (ConfigError) naming the file that is wrong."""
    try:
        data = load_speech(cfg.data.path, cfg.data.sample_rate, cfg.data.clip_seconds, cfg.data.words)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data: {err}") from err
    if not data.val or not data.test:
        raise ConfigError(f"data: {data.counts()}: validation and test need at least one clip each")
    return data


def build_model(cfg: SpeechConfig, num_labels: int) -> nn.Module:
    from .model.conformer import ConformerClassifier

    return ConformerClassifier(cfg.model, cfg.features, cfg.data.sample_rate, num_labels)


def make_augment(cfg: SpeechConfig, model: nn.Module, data: SpeechData):
    """The training batches' augment hook (None when ``augment.enabled`` is false)."""
    from .data.audio_augment import SpeechAugment

    if not cfg.augment.enabled:
        return None
    frames = model.log_mel.frames(cfg.data.clip_samples)
    return SpeechAugment(cfg.augment, cfg.data.sample_rate, frames, cfg.features.n_mels, data.noise)


def reported_metrics(cfg: SpeechConfig) -> tuple[str, ...]:
    """What every evaluation reports (train.early_stopping.metric and tune's objective name one)."""
    return CLASSIFIER_METRICS


def with_noise(batches: Iterator[dict[str, Tensor]], snr_db: float, seed: int) -> Iterator[dict[str, Tensor]]:
    """The batches mixed with coloured noise at ``snr_db``, drawn from a fixed seed: the same noisy test every run."""
    from .data.audio_augment import coloured_noise, mix_at_snr

    g = torch.Generator().manual_seed(seed)
    for batch in batches:
        x = batch["input_values"]
        noise = coloured_noise(len(x), x.shape[-1], 2 * torch.rand(len(x), generator=g), g)
        yield {**batch, "input_values": mix_at_snr(x, noise, torch.full((len(x),), snr_db))}


@torch.no_grad()
def evaluate(
    model: nn.Module, clips: list, cfg: SpeechConfig, labels: list[str], device, max_batches=None, snr_db=None
) -> dict:
    """Loss, accuracy, per-class and macro precision/recall/F1, confusion matrix; never augmented (``snr_db``: the
    clips mixed with a fixed draw of coloured noise, a robustness score)."""
    batches = iter_batches(clips, cfg.train.batch_size, speech_collate(cfg.data.clip_samples))
    if snr_db is not None:
        batches = with_noise(batches, snr_db, cfg.train.seed)
    return evaluate_classifier(model, batches, labels, device, max_batches)


def run(cfg: SpeechConfig, dbg: DebugConfig | None = None) -> dict:
    """Train as configured; returns the final metrics (also in run_dir/metrics.json). Raises ConfigError."""
    from .debug import effective_num_workers

    dbg = dbg or DebugConfig()
    with training_run(cfg, dbg) as run:
        info, run_dir = run.info, run.run_dir
        data = read_data(cfg)  # bad audio is reported before anything is built or written
        check_resume_labels(run.resume_from, data.labels)  # a resumed head must have the same words
        run.start(cfg)
        model = build_model(cfg, len(data.labels)).to(info.device)
        clip_samples = cfg.data.clip_samples
        flops = model.flops_per_example(clip_samples)
        if info.is_main:
            print(f"model: Conformer, {model.num_params():,} parameters on {info.device}", flush=True)
            print(f"data: {data.counts()}, {len(data.labels)} words, {data.sample_rate} Hz", flush=True)
        augment = make_augment(cfg, model, data)
        model = run.wrap(model, cfg.train.compile)
        run.save_config(cfg)
        if info.is_main:
            LabelMap(data.labels).save(run_dir)

        source = ExampleBatches(
            data.train,
            cfg.train.batch_size,
            speech_collate(clip_samples),
            seed=cfg.train.seed + info.rank,
            num_workers=effective_num_workers(cfg.data.num_workers),
            augment=augment,
        )

        def evaluate_val(m: nn.Module, limit: int | None = cfg.train.eval_batches) -> dict[str, float]:
            return scalar_metrics(evaluate(m, data.val, cfg, data.labels, info.device, limit))

        history = fit(
            model,
            source,
            cfg.train,
            run_dir,
            optim=cfg.optim,
            setup=run.setup,
            job=Job(
                evaluate=evaluate_val,
                validate=lambda m: evaluate_val(m, None),
                metrics=reported_metrics(cfg),
                config=cfg,
                extra_state={"labels": data.labels},
                flops_per_item=flops,
                unit="ex",
            ),
        )
        result: dict[str, Any] = {}
        if info.is_main:
            result = finish(cfg, run_dir, unwrap(model), data, history, run.setup.autocast)
        barrier()
        return result


def finish(cfg: SpeechConfig, run_dir, model: nn.Module, data: SpeechData, history: list[dict], autocast) -> dict:
    """Score the held-out test voices (``eval``) and the validation voices (``val``), write metrics.json."""
    device = next(model.parameters()).device
    model.eval()
    with autocast:  # the training run's, as for fit's evaluations
        result: dict[str, Any] = {
            "task": "speech",
            **history_result(history),
            "total_params": model.num_params(),
            "augment": cfg.augment.enabled,
            "data": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
            "val": evaluate(model, data.val, cfg, data.labels, device),
            "eval": evaluate(model, data.test, cfg, data.labels, device),
        }
        if cfg.noisy_test_snr_db is not None:
            noisy = evaluate(model, data.test, cfg, data.labels, device, snr_db=cfg.noisy_test_snr_db)
            result["eval_noisy"] = {"snr_db": cfg.noisy_test_snr_db, **noisy}
        print(f"test voices in noise at {cfg.noisy_test_snr_db:g} dB SNR: accuracy {noisy['accuracy']:.4f}", flush=True)
    model.train()
    report_final(run_dir, result, cfg.train.logger)
    return result


def main(argv: list[str] | None = None) -> None:
    run_cli(SpeechConfig, run, argv, prog=f"python -m {__package__}.speech")


if __name__ == "__main__":
    main()
