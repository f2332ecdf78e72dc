"""Checkpoints: complete state round trip, tied weights, weights-only loading, atomic publication, crash safety,
self-verification (manifest, damaged files refused or skipped, never deleted)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from {{ cookiecutter.package }}.config import ConfigError, OptimConfig
from {{ cookiecutter.package }}.model.lm import LlamaLM
from {{ cookiecutter.package }}.runtime import named_checkpoint, resolve_start
from {{ cookiecutter.package }}.train import checkpoint as ckpt
from {{ cookiecutter.package }}.train import state as ckpt_state
from {{ cookiecutter.package }}.train.optim import build_optimizer, build_scheduler


def _trained(model, steps=2):
    cfg = OptimConfig(lr=1e-2, warmup_steps=1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return opt, sched


def test_round_trip_restores_everything(tmp_path, tiny_model, tiny_model_config):
    opt, sched = _trained(tiny_model)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ckpt.save_checkpoint(
        tmp_path, 12, tiny_model, opt, sched, data_state={"step": 12, "seed": 0}, config={"a": [1, 2]}, extra={"k": "v"}
    )
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())

    fresh = LlamaLM(tiny_model_config)
    opt2 = build_optimizer(fresh, OptimConfig(lr=1e-2, warmup_steps=1))
    sched2 = build_scheduler(opt2, OptimConfig(lr=1e-2, warmup_steps=1), total_steps=10)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state = ckpt.load_checkpoint(path, fresh, opt2, sched2)

    assert path.name == "step-000012" and ckpt.latest_checkpoint(tmp_path) == path
    assert (state["step"], state["data"]) == (12, {"step": 12, "seed": 0})
    assert (state["config"], state["extra"]) == ({"a": [1, 2]}, {"k": "v"})
    for (n, p), q in zip(tiny_model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws


def test_trainer_state_is_weights_only_loadable(tmp_path, tiny_model):
    opt, sched = _trained(tiny_model)
    path = ckpt.save_checkpoint(tmp_path, 1, tiny_model, opt, sched, data_state={"arr": np.arange(3)})
    state = torch.load(path / ckpt.TRAINER_FILE, weights_only=True)  # no pickled code allowed
    assert state["data"] == {"arr": [0, 1, 2]}  # numpy converted to plain lists
    assert isinstance(state["rng"]["numpy"][1], list)


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path, tiny_model, tiny_model_config):
    assert tiny_model.lm_head.weight is tiny_model.embed_tokens.weight
    path = ckpt.save_checkpoint(tmp_path, 1, tiny_model)
    with safe_open(str(path / ckpt.MODEL_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert "embed_tokens.weight" in keys and "lm_head.weight" not in keys
    fresh = LlamaLM(tiny_model_config)
    ckpt.load_checkpoint(path, fresh)
    assert fresh.lm_head.weight is fresh.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, tiny_model.lm_head.weight)


def test_untied_model_keeps_both_matrices(tmp_path, tiny_model_config):
    import dataclasses

    model = LlamaLM(dataclasses.replace(tiny_model_config, tie_embeddings=False))
    path = ckpt.save_checkpoint(tmp_path, 1, model)
    fresh = LlamaLM(dataclasses.replace(tiny_model_config, tie_embeddings=False))
    ckpt.load_checkpoint(path, fresh)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(fresh.lm_head.weight, fresh.embed_tokens.weight)


def test_partly_frozen_model_saves_only_trainable_weights(tmp_path, tiny_model, tiny_model_config):
    for name, p in tiny_model.named_parameters():
        p.requires_grad_(name.startswith("layers.1."))
    path = ckpt.save_checkpoint(tmp_path, 1, tiny_model)
    with safe_open(str(path / ckpt.MODEL_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith("layers.1.") for k in keys)
    fresh = LlamaLM(tiny_model_config)
    for name, p in fresh.named_parameters():
        p.requires_grad_(name.startswith("layers.1."))
    ckpt.load_checkpoint(path, fresh)  # non-strict: the frozen base comes from elsewhere
    assert torch.equal(fresh.layers[1].mlp.up_proj.weight, tiny_model.layers[1].mlp.up_proj.weight)


def test_save_model_callback_writes_into_the_published_checkpoint(tmp_path, tiny_model):
    def save_adapter(model, directory):
        (directory / "adapter").mkdir()
        (directory / "adapter" / "adapter_config.json").write_text("{}")

    path = ckpt.save_checkpoint(tmp_path, 3, tiny_model, save_model=save_adapter)
    assert (path / "adapter" / "adapter_config.json").is_file()


def test_latest_pointer_and_retention(tmp_path, tiny_model):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, tiny_model, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert (tmp_path / "latest").read_text().strip() == "step-000004"
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000004"


@pytest.mark.parametrize("fail_in", ["torch_save", "safetensors", "save_model", "rename"])
def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, tiny_model, tiny_model_config, monkeypatch, fail_in):
    good = ckpt.save_checkpoint(tmp_path, 5, tiny_model, data_state={"step": 5})
    with torch.no_grad():
        tiny_model.norm.weight.add_(1.0)  # the next save would differ

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    save_model = None
    if fail_in == "torch_save":
        monkeypatch.setattr(ckpt.torch, "save", boom)
    elif fail_in == "safetensors":
        monkeypatch.setattr(ckpt_state, "save_file", boom)
    elif fail_in == "save_model":
        save_model = boom
    else:
        monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(tmp_path, 10, tiny_model, data_state={"step": 10}, save_model=save_model)
    monkeypatch.undo()

    assert ckpt.latest_checkpoint(tmp_path) == good
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step-")] == ["step-000005"]
    fresh = LlamaLM(tiny_model_config)
    state = ckpt.load_checkpoint(good, fresh)
    assert state["data"] == {"step": 5}
    assert not torch.equal(fresh.norm.weight, tiny_model.norm.weight)  # the old weights, not the new ones


def test_half_written_directories_are_ignored_and_cleaned(tmp_path, tiny_model):
    good = ckpt.save_checkpoint(tmp_path, 5, tiny_model)
    # A save killed before its rename, and a directory someone copied in by hand without its trainer state.
    (tmp_path / ".tmp-step-000010-4242").mkdir()
    (tmp_path / ".tmp-step-000010-4242" / ckpt.MODEL_FILE).write_bytes(b"partial")
    (tmp_path / "step-000020").mkdir()
    (tmp_path / "step-000020" / ckpt.MODEL_FILE).write_bytes(b"partial")
    (tmp_path / "latest").write_text("step-000020\n")  # even a pointer to it is not trusted
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.newest_intact(tmp_path) == good
    ckpt.save_checkpoint(tmp_path, 6, tiny_model)
    assert not (tmp_path / ".tmp-step-000010-4242").exists()


def test_missing_pointer_falls_back_to_newest(tmp_path, tiny_model):
    ckpt.save_checkpoint(tmp_path, 1, tiny_model)
    newest = ckpt.save_checkpoint(tmp_path, 2, tiny_model)
    (tmp_path / "latest").unlink()
    assert ckpt.latest_checkpoint(tmp_path) == newest


def test_named_checkpoint(tmp_path, tiny_model):
    path = ckpt.save_checkpoint(tmp_path / "run" / "checkpoints", 3, tiny_model)
    assert named_checkpoint(str(path)) == path
    assert named_checkpoint(str(tmp_path / "run")) == path  # a run directory means its latest
    assert named_checkpoint(tmp_path / "run" / "checkpoints") == path
    with pytest.raises(ConfigError, match="train.resume_from=.*: no complete checkpoint"):
        named_checkpoint(str(tmp_path / "nope"))


def test_resolve_start_follows_resume_and_resume_from(tmp_path, tiny_model, tiny_train_config):
    run, fresh = tmp_path / "run", tiny_train_config
    auto = dataclasses.replace(fresh, resume="auto")
    assert resolve_start(run, fresh) is None and resolve_start(run, auto) is None  # nothing yet: a fresh start
    path = ckpt.save_checkpoint(run / "checkpoints", 3, tiny_model)
    assert resolve_start(run, auto) == path
    assert resolve_start(tmp_path / "other", dataclasses.replace(fresh, resume_from=str(run))) == path
    with pytest.raises(ConfigError, match="already has checkpoints"):
        resolve_start(run, fresh)


def test_resave_same_step_replaces_atomically(tmp_path, tiny_model, tiny_model_config):
    ckpt.save_checkpoint(tmp_path, 4, tiny_model)
    with torch.no_grad():
        tiny_model.norm.weight.fill_(3.0)
    path = ckpt.save_checkpoint(tmp_path, 4, tiny_model)
    fresh = LlamaLM(tiny_model_config)
    ckpt.load_checkpoint(path, fresh)
    assert torch.all(fresh.norm.weight == 3.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000004"]


# ---- self-verifying checkpoints ------------------------------------------------------------------------------------


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path, tiny_model):
    def save_adapter(model, directory):
        (directory / "adapter").mkdir()
        (directory / "adapter" / "adapter_config.json").write_text('{"r": 4}')

    path = ckpt.save_checkpoint(tmp_path, 3, tiny_model, save_model=save_adapter)
    manifest = json.loads((path / ckpt.MANIFEST_FILE).read_text())
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {ckpt.MANIFEST_FILE}
    assert manifest["format"] == 1 and set(manifest["files"]) == files
    assert files == {ckpt.MODEL_FILE, ckpt.TRAINER_FILE, "adapter/adapter_config.json"}
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_damaged_checkpoint_is_refused_and_skipped(tmp_path, tiny_model, tiny_model_config, damage):
    older = ckpt.save_checkpoint(tmp_path, 1, tiny_model)
    newer = ckpt.save_checkpoint(tmp_path, 2, tiny_model)
    problem = damage(newer / ckpt.MODEL_FILE)
    damaged_bytes = (newer / ckpt.MODEL_FILE).read_bytes()

    fresh = LlamaLM(tiny_model_config)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    refusal = rf"damaged checkpoint {re.escape(str(newer))}: {problem} \(resume from another checkpoint; .*\)"
    with pytest.raises(ckpt.DamagedCheckpointError) as err:
        ckpt.load_checkpoint(newer, fresh)
    assert re.fullmatch(refusal, str(err.value))
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # refused before loading anything
    for read in (ckpt.load_trainer_state, lambda p: named_checkpoint(str(p))):
        with pytest.raises(ConfigError, match=re.escape(str(newer))):  # entry points turn it into exit 2
            read(newer)

    for newest in (ckpt.newest_intact, named_checkpoint):  # a named run means its newest intact checkpoint too
        notices = []
        assert newest(tmp_path, notices.append) == older
        (skipped,) = notices  # one line per damaged checkpoint skipped
        assert re.fullmatch(rf"skipping damaged checkpoint {re.escape(str(newer))}: {problem}", skipped)
    assert (newer / ckpt.MODEL_FILE).read_bytes() == damaged_bytes  # nothing deleted or repaired
    assert ckpt.latest_checkpoint(tmp_path) == newer  # the pointer is left alone too


def test_no_intact_checkpoint_means_a_fresh_start_for_auto_and_an_error_for_a_named_run(tmp_path, tiny_model):
    for step in (1, 2):
        path = ckpt.save_checkpoint(tmp_path, step, tiny_model)
        (path / ckpt.TRAINER_FILE).write_bytes(b"")
    notices = []
    assert ckpt.newest_intact(tmp_path, notices.append) is None
    assert [n.split(":")[0] for n in notices] == [
        f"skipping damaged checkpoint {tmp_path / 'step-000002'}",
        f"skipping damaged checkpoint {tmp_path / 'step-000001'}",
    ]
    with pytest.raises(ckpt.DamagedCheckpointError, match="every checkpoint in .* is damaged"):
        named_checkpoint(str(tmp_path))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]


@pytest.mark.parametrize(
    ("spoil", "problem"),
    [
        (lambda p: (p / ckpt.TRAINER_FILE).unlink(), "trainer.pt is missing"),
        (lambda p: (p / ckpt.MANIFEST_FILE).write_text("{"), "manifest.json is unreadable (Expecting"),
        (lambda p: (p / ckpt.MANIFEST_FILE).write_text('{"format": 7}'), "manifest.json has format 7, this version"),
    ],
)
def test_a_published_checkpoint_with_a_broken_manifest_or_a_lost_file_is_damaged(tmp_path, tiny_model, spoil, problem):
    path = ckpt.save_checkpoint(tmp_path, 1, tiny_model)
    spoil(path)
    assert ckpt.list_checkpoints(tmp_path) == [path]  # still listed, so it is reported rather than silently ignored
    with pytest.raises(ckpt.DamagedCheckpointError, match=re.escape(problem)):
        ckpt.verify_checkpoint(path)


def test_checkpoint_without_manifest_loads_unverified_with_a_notice(tmp_path, tiny_model, tiny_model_config):
    path = ckpt.save_checkpoint(tmp_path, 4, tiny_model, data_state={"step": 4})
    (path / ckpt.MANIFEST_FILE).unlink()  # as saved before checkpoints had manifests
    for resolve in (lambda log: ckpt.newest_intact(tmp_path, log), lambda log: named_checkpoint(str(path), log)):
        notices = []
        assert resolve(notices.append) == path
        assert notices == [f"notice: {path} has no manifest.json (saved by an older version): using it unverified"]
    fresh = LlamaLM(tiny_model_config)
    assert ckpt.load_checkpoint(path, fresh)["data"] == {"step": 4}
    assert torch.equal(fresh.norm.weight, tiny_model.norm.weight)


def test_retention_neither_counts_nor_deletes_damaged_checkpoints(tmp_path, tiny_model):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, tiny_model)
    (tmp_path / "step-000003" / ckpt.MODEL_FILE).write_bytes(b"")
    ckpt.save_checkpoint(tmp_path, 4, tiny_model, keep=2)
    # Counting the damaged step 3 would have kept only one intact checkpoint (step 4) and deleted step 2.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000002", "step-000003", "step-000004"]


def test_retention_keeps_the_checkpoint_a_resumed_run_writes_below_newer_damaged_ones(tmp_path, tiny_model, damage):
    ckpt.save_checkpoint(tmp_path, 20, tiny_model)
    bad = ckpt.save_checkpoint(tmp_path, 40, tiny_model)
    damage(bad / ckpt.MODEL_FILE)
    assert ckpt.newest_intact(tmp_path) == tmp_path / "step-000020"  # a resumed run goes on from here
    saved = ckpt.save_checkpoint(tmp_path, 25, tiny_model, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000025", "step-000040"]
    assert ckpt.newest_intact(tmp_path) == saved == ckpt.latest_checkpoint(tmp_path)


def test_retention_hashes_the_newer_checkpoints_a_resumed_run_leaves_behind(tmp_path, tiny_model, damage):
    for step in (10, 20, 40):
        ckpt.save_checkpoint(tmp_path, step, tiny_model)
    damage(tmp_path / "step-000040" / ckpt.MODEL_FILE)  # also a flipped bit, which sizes alone would not show
    assert ckpt.newest_intact(tmp_path) == tmp_path / "step-000020"
    ckpt.save_checkpoint(tmp_path, 25, tiny_model, keep=2)
    # Counting the damaged step 40 as one of the two kept would have deleted step 20, an intact one.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000020", "step-000025", "step-000040"]


def test_resaving_a_damaged_step_keeps_the_damaged_copy(tmp_path, tiny_model, tiny_model_config):
    path = ckpt.save_checkpoint(tmp_path, 4, tiny_model)
    (path / ckpt.MODEL_FILE).write_bytes(b"junk")
    with torch.no_grad():
        tiny_model.norm.weight.fill_(2.0)
    assert ckpt.save_checkpoint(tmp_path, 4, tiny_model) == path
    ckpt.verify_checkpoint(path)
    fresh = LlamaLM(tiny_model_config)
    ckpt.load_checkpoint(path, fresh)
    assert torch.all(fresh.norm.weight == 2.0)
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("step-000004.damaged-")]
    assert (aside / ckpt.MODEL_FILE).read_bytes() == b"junk"
    assert ckpt.list_checkpoints(tmp_path) == [path]
