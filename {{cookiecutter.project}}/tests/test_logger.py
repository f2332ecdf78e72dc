"""The logging pieces of fit: one device read per window (StepLog), gradient health, what a run writes (RunLogger)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time

import pytest
import torch

from {{ cookiecutter.package }}.data.corpus import TokenWindows
from {{ cookiecutter.package }}.runtime import resolve_start
from {{ cookiecutter.package }}.train.health import GradHealth
from {{ cookiecutter.package }}.train.logger import RunLogger, StepLog
from {{ cookiecutter.package }}.train.loop import RunSetup, fit
from {{ cookiecutter.package }}.train.step import NonFiniteError, StepResult, train_step


def _result(loss: float, grad_norm: float = 1.0, tokens: int = 64) -> StepResult:
    loss_t, norm_t = torch.tensor(loss), torch.tensor(grad_norm)
    finite = torch.isfinite(loss_t) & torch.isfinite(norm_t)
    return StepResult(loss=loss_t, grad_norm=norm_t, lr=1e-3, tokens=torch.tensor(float(tokens)), finite=finite)


def test_step_log_reads_a_window_into_records():
    log = StepLog(flops_per_token=10.0, peak_flops=1e6)
    for step, loss in enumerate([3.0, 2.5, 2.0], start=1):
        log.add(step, _result(loss))
    records = log.read()
    assert [r["step"] for r in records] == [1, 2, 3] and [r["loss"] for r in records] == [3.0, 2.5, 2.0]
    tok_s = records[0]["tokens_per_s"]
    assert tok_s > 0 and all(r["tokens_per_s"] == tok_s for r in records)  # the window's average
    assert records[0]["mfu"] == pytest.approx(tok_s * 10.0 / 1e6)
    assert not log.pending and log.failed is None
    log.raise_if_failed()  # nothing to report


def test_step_log_stops_at_the_first_skipped_step():
    log = StepLog(flops_per_token=None, peak_flops=1.0)
    for step, loss in ((1, 2.0), (2, float("nan")), (3, 1.9)):
        log.add(step, _result(loss))
    records = log.read()
    assert [r["step"] for r in records] == [1, 2]  # up to and including the bad one, nothing after it
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at step 2"):
        log.raise_if_failed()


def test_step_log_reports_compiling_instead_of_throughput():
    log = StepLog(flops_per_token=1.0, peak_flops=1.0)
    log.add(1, _result(2.0))
    (record,) = log.read(compiling=True)
    assert record["compile_s"] > 0 and "tokens_per_s" not in record and "mfu" not in record


def test_run_logger_truncates_on_resume_and_appends(tmp_path, tiny_train_config, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4)]  # a killed run logged past its checkpoint at step 2
    torn = '{"step": 5, "lo'  # and died half-way through a line
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale) + torn)
    cfg = dataclasses.replace(tiny_train_config, max_steps=4)
    logger = RunLogger(run_dir, cfg, start_step=2, main=True, progress=False)
    record = {"step": 3, "loss": 0.5, "lr": 1e-3, "grad_norm": 0.25, "tokens": 64.0, "tokens_per_s": 1e3, "mfu": 0.1}
    logger.train_line(record)
    logger.eval_lines(3, {"eval_loss": 0.75}, ["a sample"])
    logger.append_metrics([record])
    logger.close()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    out = capsys.readouterr().out
    assert "step 3/4  loss 0.5000" in out and "tok/s 1,000  mfu 10.0%" in out
    assert "eval step 3: loss 0.75" in out and "a sample" in out


def test_run_logger_off_rank_0_writes_nothing(tmp_path, tiny_train_config, capsys):
    logger = RunLogger(tmp_path / "run", tiny_train_config, 0, main=False, progress=True)
    logger.train_line({"step": 1, "loss": 1.0, "lr": 1.0, "grad_norm": 1.0, "tokens_per_s": 1.0, "mfu": 0.0})
    logger.append_metrics([{"step": 1}])
    logger.close()
    assert not (tmp_path / "run").exists() and capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------- gradient health


def _health_run(model, cfg, tokens, tmp_path):
    source = TokenWindows(tokens, cfg.batch_size, 16, seed=0)
    return fit(model, source, cfg, tmp_path / "run")


def test_grad_health_writes_per_module_series_to_tensorboard(tiny_model, tiny_train_config, pattern_tokens, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = dataclasses.replace(tiny_train_config, max_steps=4, log_every=2, logger="tensorboard")
    _health_run(tiny_model, cfg, pattern_tokens, tmp_path)
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    scalars, histograms = set(events.Tags()["scalars"]), set(events.Tags()["histograms"])
    for module in ("embed_tokens", "layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "norm"):
        for kind in ("grad_norm", "weight_norm", "update_ratio"):
            assert f"{kind}/{module}" in scalars, (kind, module)
            assert [e.step for e in events.Scalars(f"{kind}/{module}")] == [2, 4]  # every log_every, nothing between
        assert f"grad/{module}" in histograms
    ratio = events.Scalars("update_ratio/layers.0.mlp.up_proj")[0].value
    assert 0 < ratio < 1  # AdamW moved the weights, by a small fraction of their size


def test_grad_stats_off_writes_no_per_module_series(tiny_model, tiny_train_config, pattern_tokens, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = dataclasses.replace(tiny_train_config, max_steps=2, logger="tensorboard", grad_stats=False)
    _health_run(tiny_model, cfg, pattern_tokens, tmp_path)
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert "train/loss" in scalars and not events.Tags()["histograms"]
    assert not [tag for tag in scalars if tag.startswith(("grad_norm/", "weight_norm/", "update_ratio/"))]


@pytest.mark.parametrize("fused", [True, False])
def test_update_ratio_is_the_weights_relative_move_without_a_copy_of_them(tiny_model, pattern_tokens, fused):
    """The update derived from AdamW's moments is the one the weights made: decay and no-decay groups, amsgrad off,
    a learning rate the scheduler changes every step, against a copy of the weights taken here, not by GradHealth."""
    groups = [
        {"params": [p for p in tiny_model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in tiny_model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-2, fused=fused, foreach=not fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    health = GradHealth(tiny_model, opt, every=1)
    source = TokenWindows(pattern_tokens, 4, 16, seed=0)
    for step in range(1, 4):
        before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
        train_step(
            tiny_model, [source.next_batch()], opt, sched, grad_clip=1.0, autocast=contextlib.nullcontext(),
            step=step, on_gradients=health.capture_gradients,
        )  # fmt: skip
        health.capture_update(step)
        stats = health.read()[1]
        for module in ("embed_tokens", "layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "norm"):
            weight = dict(tiny_model.named_parameters())[f"{module}.weight"].detach()
            expected = float((weight - before[f"{module}.weight"]).norm() / weight.norm())
            assert stats[module]["update_ratio"] == pytest.approx(expected, rel=1e-4), (step, module)


def test_zeroed_layer_triggers_the_vanishing_warning_naming_it(
    tiny_model, tiny_train_config, pattern_tokens, tmp_path, capsys
):
    with torch.no_grad():  # silu(0) * 0 = 0: no gradient reaches this MLP, and AdamW never moves it off zero
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(tiny_model.layers[1].mlp, name).weight.zero_()
    cfg = dataclasses.replace(tiny_train_config, max_steps=4, log_every=1)
    _health_run(tiny_model, cfg, pattern_tokens, tmp_path)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "vanishing" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: vanishing gradients at step 3")
    assert "layers.1.mlp.gate_proj" in warnings[0] and "layers.1.mlp.down_proj" in warnings[0]
    assert "layers.0." not in warnings[0]


def test_huge_learning_rate_triggers_the_exploding_warning_before_the_loss_turns_nan(tiny_model, pattern_tokens):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3, fused=True)
    health = GradHealth(tiny_model, opt, every=1)
    source = TokenWindows(pattern_tokens, 4, 16, seed=0)
    warned_at, nan_at = None, None
    for step in range(1, 31):
        if step == 12:  # the window of normal steps is full: now the learning rate goes wild
            opt.param_groups[0]["lr"] = 3.0  # 3000x: Adam moves every weight by ~3 per step
        result = train_step(
            tiny_model,
            [source.next_batch()],
            opt,
            None,
            grad_clip=0.0,
            autocast=contextlib.nullcontext(),
            step=step,
            on_gradients=health.capture_gradients,
        )
        health.capture_update(step)
        _, stats, _, warnings = health.read()
        if warned_at is None and any("exploding gradients" in w for w in warnings):
            warned_at = step
        if nan_at is None and not bool(result.finite):
            nan_at = step
    assert warned_at is not None and warned_at > 11  # nothing during the normal steps
    assert nan_at is None or warned_at < nan_at


# ---------------------------------------------------------------------------------------------- Weights & Biases


def _wandb_history(path, timeout: float = 30.0):
    """(run id, history rows) of an offline W&B run, read from its .wandb file: LevelDB log records (7-byte headers
    in 32 KiB blocks) holding wandb's protobuf Records, after a 7-byte file header. wandb's service process may still
    be writing after ``finish()`` returns: read until the run's final ``exit`` record is there."""
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    run_id = next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run")
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    return run_id, history


def _wandb_records(path):
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # block padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk  # full, first | middle, last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def test_wandb_offline_run_logs_what_metrics_jsonl_has_and_resume_keeps_its_id(
    tiny_model, tiny_train_config, pattern_tokens, tmp_path, monkeypatch
):
    pytest.importorskip("wandb", reason='W&B is optional: pip install -e ".[wandb]"')
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = dataclasses.replace(tiny_train_config, max_steps=4, log_every=2, save_every=2, logger="wandb")
    run_dir = tmp_path / "run"
    fit(tiny_model, TokenWindows(pattern_tokens, cfg.batch_size, 16, seed=0), cfg, run_dir)
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    run_id, history = _wandb_history(path)
    assert (run_dir / "wandb-run-id").read_text().strip() == run_id
    logged = {row["_step"]: row for row in history if "train/loss" in row}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(logged) == [2, 4]  # the log steps
    for record in metrics:
        if record["step"] in logged:
            assert logged[record["step"]]["train/loss"] == pytest.approx(record["loss"], rel=1e-6)
    assert any(key.startswith("grad_norm/") for row in history for key in row)  # gradient health goes there too
    assert not (run_dir / "tb").exists()  # logger=wandb: no TensorBoard files

    more = dataclasses.replace(cfg, max_steps=6)
    source = TokenWindows(pattern_tokens, cfg.batch_size, 16, seed=0)
    resume_from = resolve_start(run_dir, dataclasses.replace(more, resume="auto"))
    fit(tiny_model, source, more, run_dir, setup=RunSetup(resume_from=resume_from))
    runs = [_wandb_history(path) for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")]
    assert len(runs) == 2 and {rid for rid, _ in runs} == {run_id}  # the resumed run continued the same W&B run
    resumed = next(rows for _, rows in runs if any(row.get("_step") == 6 for row in rows))
    assert sorted(row["_step"] for row in resumed if "train/loss" in row) == [6]


def test_wandb_logger_without_the_package_is_a_one_line_error(monkeypatch):
    import sys

    from {{ cookiecutter.package }}.config import ConfigError
    from {{ cookiecutter.package }}.train.logger import require_logger

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r'train.logger=both needs wandb: pip install -e ".\[wandb\]"'):
        require_logger("both")
    require_logger("tensorboard")  # needs nothing extra
