"""Early stopping, the overfitting signal and the best checkpoint (train/stopping.py): an MLP that memorises noisy
labels stops after its best validation loss and ends with the best weights, whose test loss beats the last step's;
the stopping state resumes exactly; retention never prunes the best; a damaged pointer or checkpoint falls back
safely; two gloo ranks take one decision; pretrain exports the best checkpoint (finetune: test_finetune.py); sharded
(fsdp) checkpoints keep and restore the best too."""

from __future__ import annotations

import dataclasses
import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from {{ cookiecutter.package }} import pretrain
from {{ cookiecutter.package }}.config import ConfigError, EarlyStoppingConfig, OptimConfig, TrainConfig, parse_config
from {{ cookiecutter.package }}.config.pretrain import PretrainConfig
from {{ cookiecutter.package }}.model.transformer import ClassifierOutput
from {{ cookiecutter.package }}.train import checkpoint as ckpt
from {{ cookiecutter.package }}.train.loop import Job, RunSetup, evaluate_classifier, fit
from {{ cookiecutter.package }}.train.sharded import is_sharded_checkpoint
from {{ cookiecutter.package }}.train.stopping import Watch, direction, restore_best

DIM = 5
OPTIM = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, weight_decay=0.0)


def _noisy_split(n: int, w: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Labels from a linear rule, a fifth of them flipped: a wide MLP learns the rule, then memorises the flips."""
    x = torch.randn(n, DIM, generator=g)
    y = (x @ w > 0).long()
    return {"x": x, "labels": torch.where(torch.rand(n, generator=g) < 0.2, 1 - y, y)}


@pytest.fixture(scope="module")
def noisy() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(DIM, generator=g)
    return {name: _noisy_split(n, w, g) for name, n in (("train", 60), ("val", 300), ("test", 300))}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> ClassifierOutput:
        logits = self.net(x)
        return ClassifierOutput(logits=logits, loss=F.cross_entropy(logits, labels))


class FullBatch:
    """The whole training set every step; ``die_after`` batches, then a simulated kill."""

    def __init__(self, batch: dict[str, torch.Tensor], die_after: int | None = None) -> None:
        self.batch, self.left = batch, die_after

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.left == 0:
            raise KeyboardInterrupt("simulated kill")
        self.left = None if self.left is None else self.left - 1
        return self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    metrics = evaluate_classifier(model, [batch], ["0", "1"], torch.device("cpu"))
    return {"loss": metrics["loss"], "accuracy": metrics["accuracy"]}


def _cfg(**overrides) -> TrainConfig:
    stopping = EarlyStoppingConfig(enabled=True, patience=5, **overrides.pop("early_stopping", {}))
    train = dict(max_steps=200, batch_size=60, log_every=1000, eval_every=5, save_every=0, keep_checkpoints=0,
                 device="cpu", precision="fp32", logger="none", early_stopping=stopping)  # fmt: skip
    return TrainConfig(**{**train, **overrides})


def _fit(run_dir, noisy, cfg, *, die_after=None, resume=False) -> tuple[MLP, list[dict]]:
    torch.manual_seed(0)
    model = MLP()
    resume_from = ckpt.newest_intact(run_dir / "checkpoints") if resume else None
    job = Job(evaluate=lambda m: _scores(m, noisy["val"]), metrics=("loss", "accuracy"))
    source = FullBatch(noisy["train"], die_after)
    return model, fit(model, source, cfg, run_dir, optim=OPTIM, setup=RunSetup(resume_from=resume_from), job=job)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the decision ----------------------------------------------------------------------------------------------------


def test_direction_follows_the_metric_unless_given():
    assert [direction(m, None) for m in ("loss", "perplexity", "accuracy", "macro_f1")] == ["min", "min", "max", "max"]
    assert direction("loss", "max") == "max" and direction("accuracy", "min") == "min"


def test_watch_counts_patience_with_min_delta_and_warns_once_while_training_loss_falls():
    watch = Watch(EarlyStoppingConfig(enabled=True, metric="accuracy", patience=3, min_delta=0.01, warn_after=2))

    def evaluation(step, accuracy, train_loss):
        watch.add_training([{"loss": train_loss}, {"loss": train_loss}])
        return watch.update(step, {"eval_loss": 1.0, "eval_accuracy": accuracy})

    assert evaluation(1, 0.50, 0.9).improved
    assert evaluation(2, 0.505, 0.8).improved is False  # within min_delta: no improvement
    second = evaluation(3, 0.70, 0.7)
    assert second.improved and second.gap == pytest.approx(0.3) and watch.best_step == 3
    assert (evaluation(4, 0.69, 0.6).warning, watch.state.bad) == (None, 1)
    warned = evaluation(5, 0.65, 0.5)
    assert warned.warning == (
        "warning: overfitting? validation accuracy has not improved for 2 evaluations (best 0.7 at step 3) while the "
        "training loss fell 0.7000 -> 0.5000; validation - training loss gap 0.5000 (was 0.3000 at the best)"
    )
    last = evaluation(6, 0.60, 0.4)
    assert last.warning is None  # once per streak
    assert last.stop == (
        "early stopping at step 6: validation accuracy has not improved for 3 evaluations (patience 3); best 0.7 at "
        "step 3"
    )
    assert watch.stopped and watch.state.stopped_at == 6


def test_no_warning_when_the_training_loss_did_not_fall_and_no_stop_when_disabled():
    watch = Watch(EarlyStoppingConfig(enabled=False, patience=1, warn_after=1))
    verdicts = []
    for step, value in enumerate([0.5, 0.6, 0.7, 0.8], 1):
        watch.add_training([{"loss": 0.4}])
        verdicts.append(watch.update(step, {"eval_loss": value}))
    assert [v.improved for v in verdicts] == [True, False, False, False]
    assert all(v.stop is None and v.warning is None for v in verdicts) and not watch.stopped


def test_unusable_settings_fail_with_one_line(tmp_path, noisy):
    with pytest.raises(ConfigError, match=r"metric='f1' is not reported by this program: it reports loss, accuracy"):
        _fit(tmp_path / "a", noisy, _cfg(early_stopping={"metric": "f1"}))
    with pytest.raises(ConfigError, match="needs a validation set and train.eval_every > 0"):
        _fit(tmp_path / "b", noisy, _cfg(eval_every=0))


# ---- a run that overfits ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, noisy):
    run_dir = tmp_path_factory.mktemp("overfit") / "run"
    model, history = _fit(run_dir, noisy, _cfg(keep_checkpoints=1))
    return run_dir, model, history


def test_an_overfitting_run_stops_early_and_ends_with_the_best_weights(overfit_run, noisy):
    run_dir, model, history = overfit_run
    evals = [r for r in history if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"])
    stop = history[-1]["step"]
    assert stop < 200 and stop == best["step"] + 5 * 5  # patience 5 evaluations of every 5 steps
    assert history[-1]["weights_step"] == best["step"]
    root = run_dir / "checkpoints"
    assert ckpt.read_pointer(root, ckpt.BEST_FILE) == root / ckpt.step_dir_name(best["step"])
    assert _same(_weights(model), load_file(root / ckpt.step_dir_name(best["step"]) / ckpt.MODEL_FILE))
    last = MLP()
    last.load_state_dict(load_file(root / ckpt.step_dir_name(stop) / ckpt.MODEL_FILE))
    ours, theirs = _scores(model, noisy["test"]), _scores(last, noisy["test"])
    assert ours["loss"] < theirs["loss"] - 0.02  # the watched metric, on data neither run has seen
    gaps = [r["eval_train_gap"] for r in evals]
    assert gaps[-1] > gaps[evals.index(best)] + 0.1  # the series shows the widening gap


def test_the_run_prints_why_it_stopped_and_warns_of_overfitting(tmp_path, noisy, capsys):
    _, history = _fit(tmp_path / "run", noisy, _cfg())
    best = history[-1]["weights_step"]
    err = capsys.readouterr().err
    assert f"early stopping at step {history[-1]['step']}: validation loss has not improved for 5 evaluations" in err
    assert f"best checkpoint {tmp_path / 'run' / 'checkpoints' / ckpt.step_dir_name(best)}" in err
    (warning,) = [line for line in err.splitlines() if line.startswith("warning: overfitting?")]
    assert "has not improved for 3 evaluations (best" in warning and "while the training loss fell" in warning


def test_retention_never_prunes_the_best(overfit_run):
    run_dir, _, history = overfit_run
    kept = [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")]
    assert kept == [ckpt.step_dir_name(history[-1]["weights_step"]), ckpt.step_dir_name(history[-1]["step"])]


def test_sharded_checkpoints_keep_the_best_and_end_with_its_weights(tmp_path, noisy):
    """``--train.parallel fsdp`` (here one process, which writes the same sharded format): retention keeps the best
    checkpoint besides the last, and the run ends with the best weights, read back through DCP."""
    model, history = _fit(tmp_path / "run", noisy, _cfg(keep_checkpoints=1, parallel="fsdp"))
    root, best, stop = tmp_path / "run" / "checkpoints", history[-1]["weights_step"], history[-1]["step"]
    kept = ckpt.list_checkpoints(root)
    assert [p.name for p in kept] == [ckpt.step_dir_name(best), ckpt.step_dir_name(stop)] and best < stop
    assert all(is_sharded_checkpoint(p) and not (p / ckpt.MODEL_FILE).exists() for p in kept)
    for step, same in ((best, True), (stop, False)):
        saved = MLP()
        ckpt.load_weights(root / ckpt.step_dir_name(step), saved)
        assert _same(_weights(model), _weights(saved)) is same


def test_prune_keeps_the_checkpoint_best_names(tmp_path):
    model = nn.Linear(2, 2)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, keep=0)
    ckpt.write_pointer(tmp_path, ckpt.BEST_FILE, "step-000001")
    ckpt.save_checkpoint(tmp_path, 4, model, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000001", "step-000004"]


def test_resume_keeps_the_stopping_state_exactly(tmp_path, noisy):
    cfg = _cfg(save_every=3)
    model, straight = _fit(tmp_path / "straight", noisy, cfg)
    killed = tmp_path / "killed"
    best = straight[-1]["weights_step"]
    with pytest.raises(KeyboardInterrupt):  # mid-streak: after the best, before the stop
        _fit(killed, noisy, cfg, die_after=best + 7)
    state = ckpt.load_trainer_state(ckpt.newest_intact(killed / "checkpoints"))["stopping"]
    assert state["best_step"] == best and state["bad"] >= 1 and state["train_count"] > 0
    resumed_model, resumed = _fit(killed, noisy, cfg, resume=True)
    assert resumed[-1]["step"] == straight[-1]["step"] and resumed[-1]["weights_step"] == best
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[-len(resumed) :]]
    final = [ckpt.load_trainer_state(d / "checkpoints" / ckpt.step_dir_name(straight[-1]["step"])) for d in
             (tmp_path / "straight", killed)]  # fmt: skip
    assert final[0]["stopping"] == final[1]["stopping"]
    assert _same(_weights(model), _weights(resumed_model))
    again_model, again = _fit(killed, noisy, cfg, resume=True)  # a stopped run stays stopped
    assert again == [] and _same(_weights(again_model), _weights(model))


# ---- the best pointer and checkpoint, damaged ------------------------------------------------------------------------


def _restore_into_fresh(run_dir, history) -> tuple[nn.Module, int | None]:
    root = run_dir / "checkpoints"
    stop = history[-1]["step"]
    watch = Watch(_cfg().early_stopping)
    watch.load_state_dict(ckpt.load_trainer_state(root / ckpt.step_dir_name(stop))["stopping"])
    model = MLP()
    model.load_state_dict(load_file(root / ckpt.step_dir_name(stop) / ckpt.MODEL_FILE))
    return model, restore_best(root, model, watch, stop)


@pytest.mark.parametrize("pointer", ["step-999999\n", "../../etc\n", b"\xff\xfe\x00", None])
def test_a_damaged_best_pointer_falls_back_to_the_state_and_is_repaired(tmp_path, noisy, capsys, pointer):
    _, history = _fit(tmp_path / "run", noisy, _cfg())
    root, best = tmp_path / "run" / "checkpoints", history[-1]["weights_step"]
    if pointer is None:
        (root / ckpt.BEST_FILE).unlink()
    else:
        (root / ckpt.BEST_FILE).write_bytes(pointer if isinstance(pointer, bytes) else pointer.encode())
    capsys.readouterr()
    model, restored = _restore_into_fresh(tmp_path / "run", history)
    assert restored == best
    assert _same(_weights(model), load_file(root / ckpt.step_dir_name(best) / ckpt.MODEL_FILE))
    assert f"{root / ckpt.BEST_FILE} did not name {ckpt.step_dir_name(best)}: repaired" in capsys.readouterr().err
    assert ckpt.read_pointer(root, ckpt.BEST_FILE) == root / ckpt.step_dir_name(best)


def test_a_damaged_best_checkpoint_keeps_the_last_weights(tmp_path, noisy, capsys, damage):
    _, history = _fit(tmp_path / "run", noisy, _cfg())
    root, best, stop = tmp_path / "run" / "checkpoints", history[-1]["weights_step"], history[-1]["step"]
    problem = damage(root / ckpt.step_dir_name(best) / ckpt.MODEL_FILE)
    capsys.readouterr()
    model, restored = _restore_into_fresh(tmp_path / "run", history)
    assert restored is None
    assert _same(_weights(model), load_file(root / ckpt.step_dir_name(stop) / ckpt.MODEL_FILE))
    err = capsys.readouterr().err
    assert f"the best checkpoint {root / ckpt.step_dir_name(best)} is damaged: " in err
    assert f"keeping the weights of step {stop}" in err
    assert problem


# ---- two ranks -------------------------------------------------------------------------------------------------------


def _rank_main(rank: int, port: int, run_dir: str, noisy: dict, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Alone, rank 1 would improve where rank 0 does not: every rank must take rank 0's verdict.
        watch = Watch(EarlyStoppingConfig(enabled=True, patience=1))
        first = watch.evaluated(1, {"eval_loss": 1.0})
        second = watch.evaluated(2, {"eval_loss": 2.0 if rank == 0 else 0.5})
        # A whole run, each rank training on its own half and evaluating its own half of the validation set.
        own = {k: v[rank::2] for k, v in noisy["train"].items()}
        val = {k: v[rank::2] for k, v in noisy["val"].items()}
        torch.manual_seed(0)
        model = MLP()
        job = Job(evaluate=lambda m: _scores(m, val), metrics=("loss", "accuracy"))
        history = fit(model, FullBatch(own), _cfg(batch_size=30), run_dir, optim=OPTIM, job=job)
        weights = {k: v.tolist() for k, v in model.state_dict().items()}
        result = {"first": first.improved, "second": [second.improved, second.stop], "state": watch.state_dict(),
                  "steps": [r["step"] for r in history], "weights_step": history[-1].get("weights_step"),
                  "weights": weights}  # fmt: skip
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_take_one_decision(tmp_path, noisy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "result")
    mp.start_processes(_rank_main, args=(port, str(tmp_path / "run"), noisy, out), nprocs=2, start_method="spawn")
    zero, one = (json.loads((tmp_path / f"result.{r}").read_text()) for r in (0, 1))
    assert zero["first"] is True and zero["second"][0] is False and zero["second"][1].startswith("early stopping")
    assert one == zero  # the same verdicts, state, steps, best step and final weights
    assert zero["weights_step"] is not None and zero["steps"][-1] < 200


# ---- the entry points ------------------------------------------------------------------------------------------------

# The first evaluation is the best and no later one can improve on it by 1e9: a stop at the second evaluation.
STOP_AT_SECOND = ["--train.early_stopping.enabled", "true", "--train.early_stopping.patience", "1",
                  "--train.early_stopping.min_delta", "1e9"]  # fmt: skip


def test_pretrain_exports_the_best_checkpoint(tmp_path, pretrain_args, capsys):
    args = [*pretrain_args, "--export_hf", "true", "--train.save_every", "0", *STOP_AT_SECOND]
    history = pretrain.run(*parse_config(PretrainConfig, args))
    assert [history[-1]["step"], history[-1]["weights_step"]] == [8, 4]  # evaluations at 4 and 8 (eval_every 4)
    run_dir = tmp_path / "runs" / "tiny"
    best = load_file(run_dir / "checkpoints" / "step-000004" / ckpt.MODEL_FILE)
    exported = load_file(run_dir / "hf" / "model.safetensors")
    assert torch.equal(exported["model.embed_tokens.weight"], best["embed_tokens.weight"])
    assert not torch.equal(exported["model.embed_tokens.weight"], _weights_at(run_dir, 8)["embed_tokens.weight"])
    out = capsys.readouterr().out
    step4 = next(r for r in history if r["step"] == 4)
    assert f"eval loss {step4['eval_loss']:.4f}" in out and "weights of the best checkpoint, step 4" in out


def _weights_at(run_dir, step) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / ckpt.step_dir_name(step) / ckpt.MODEL_FILE)


def test_a_metric_the_program_does_not_report_exits_2(pretrain_args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main([*pretrain_args, "--train.early_stopping.metric", "accuracy"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "error: train.early_stopping.metric='accuracy' is not reported by this program: it reports loss, perplexity"
    )


def test_a_shipped_default_keeps_early_stopping_off():
    assert dataclasses.asdict(TrainConfig().early_stopping)["enabled"] is False
