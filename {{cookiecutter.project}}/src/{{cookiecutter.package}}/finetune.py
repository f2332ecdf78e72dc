"""LoRA fine-tuning: ``python -m <package>.finetune --config configs/finetune-sft.yaml`` (or finetune-classify.yaml).

Two tasks, chosen by ``task``:

- ``sft``: instruction tuning on JSONL prompt/response or chat ``messages`` (data/sft.py: chat or plain template,
  loss on the response tokens only, padding or packing). Evaluation: response loss and perplexity.
- ``classify``: sequence classification on CSV/JSONL text + label (data/classify.py: label set inferred and saved,
  optional class-weighted loss). Evaluation: accuracy, per-class and macro precision/recall/F1, confusion matrix.

The base model is any transformers directory or hub id, or a pre-training run directory; by default it is what
``pretrain`` exported (``runs/pretrain/hf``), so pretrain -> finetune runs offline on the builtin data sets. Under
``--debug`` the default is the debug pre-training run's export, or a tiny random model of the debug profile's size.

Training is pretrain's: the same ``fit()`` / ``train_step`` / checkpoints (only the trainable adapter weights and
their optimizer state are checkpointed; ``--train.resume auto`` wraps a fresh base model once and loads them back).

Run directory ``<out_dir>/<name>/``: ``config.yaml``, ``checkpoints/``, ``tb/``, ``metrics.jsonl`` (per step),
``metrics.json`` (final evaluation), ``adapter/`` (adapter_config.json + adapter_model.safetensors + tokenizer),
``label_map.json`` (classify), and with ``--merge true`` ``hf/`` (a standalone model with the adapter merged in).
After SFT both ``adapter/`` and ``hf/`` carry a ``generation_config.json`` whose ``eos_token_id`` lists eos and the chat
template's end of turn, so that transformers' ``generate`` stops a reply where ours does.

Exit codes: 0 done, 2 bad input (config, data, model path, QLoRA without CUDA, existing run), 1 non-finite loss.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cli import run_cli
from .config import ConfigError, DebugConfig
from .config.finetune import FinetuneConfig
from .data import batches
from .data import classify as cls_data
from .data import sft as sft_data
from .lora import (
    ADAPTER_DIR,
    MERGED_DIR,
    apply_lora,
    check_qlora,
    count_parameters,
    generate_ids,
    load_adapter,
    load_model,
    max_input_len,
    merge_and_save,
    pretrain_defaults,
    pretrain_export_dir,
    save_stop_ids,
)
from .metrics import CLASSIFIER_METRICS, LOSS_METRICS, TokenLossMeter, perplexity, scalar_metrics
from .model.transformer import ClassifierOutput
from .runtime import RunContext, check_resume_labels, training_run
from .train.distributed import barrier, get_rank, is_sharded, resolve_device, unwrap, wrap_ddp, wrap_fsdp
from .train.logger import history_result, report_final
from .train.loop import Job, evaluate_classifier, fit, to_device
from .train.sharded import full_state_dict


# ----------------------------------------------------------------------------------------------------------------------
# Classification loss
# ----------------------------------------------------------------------------------------------------------------------
class ClassifierWithLoss(nn.Module):
    """A sequence classifier whose loss we compute: cross-entropy, optionally with class weights.

    transformers' classifiers have no class-weight option; wrapping keeps ``model(**batch).loss`` (what train_step
    calls) true for both the weighted and the plain loss. ``self.model`` is the peft-wrapped classifier.
    """

    def __init__(self, model: nn.Module, class_weights: Tensor | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None, **kwargs):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, K]
        loss = None
        if labels is not None:
            # The class-weighted losses averaged over the examples, not over their summed weights (torch's weighted
            # mean): the mean train_step expects (count_targets), so a step's split into micro-batches and ranks
            # leaves it alone. Without weights the two are the same.
            losses = F.cross_entropy(logits.float(), labels, weight=self.class_weights, reduction="none")
            loss = losses.sum() / labels.ne(-100).sum()
        return ClassifierOutput(logits=logits, loss=loss)


def peft_model_of(model: nn.Module) -> nn.Module:
    """The peft model inside the (DDP-unwrapped) training module."""
    model = unwrap(model)
    return model.model if isinstance(model, ClassifierWithLoss) else model


def save_adapter(model: nn.Module, directory: Path) -> None:
    """peft's adapter files (adapter_config.json, adapter_model.safetensors) of the training ``model``, written by
    rank 0. A sharded model's trainable weights are gathered there first, so every rank calls this then."""
    peft_model = peft_model_of(model)
    if not is_sharded(unwrap(model)):
        peft_model.save_pretrained(str(directory))
        return
    state = full_state_dict(peft_model, trainable_only=True)  # the adapters (and a classifier's head): megabytes
    if get_rank() == 0:
        peft_model.save_pretrained(str(directory), state_dict=state)


# ----------------------------------------------------------------------------------------------------------------------
# Base model resolution (defaults and the --debug fallback)
# ----------------------------------------------------------------------------------------------------------------------
def resolve_base_model(cfg: FinetuneConfig, debug: bool) -> str | None:
    """``--base_model``, or else what ``pretrain`` exported; None = build a tiny one (``--debug`` without it)."""
    if cfg.base_model is not None:
        return cfg.base_model
    export = pretrain_export_dir(debug)
    if (export / "config.json").is_file():
        return str(export)
    if debug:
        return None
    raise ConfigError(
        f"{export} not found: run pretrain first (python -m {__package__}.pretrain --config configs/pretrain.yaml) "
        "or pass --base_model DIR_OR_HUB_ID"
    )


def build_tiny_base(out_dir: Path, max_seq_len: int) -> str:
    """A random LlamaLM of the debug profile's size with a BPE tokenizer trained on the builtin corpus, exported
    as a transformers directory so that it takes the same path as a real model. ~2 s."""
    from .data.builtin import read_corpus_text
    from .data.tokenizer import train_tokenizer
    from .model.hf import export_hf
    from .model.lm import LlamaLM

    print(f"--debug: no pre-trained model at {pretrain_export_dir(True)}: building a tiny random one", flush=True)
    texts = [t for t in read_corpus_text().split("\n\n") if t.strip()]
    tokenizer = train_tokenizer(texts, vocab_size=1024)
    model_cfg = dataclasses.replace(
        pretrain_defaults(debug=True).model, vocab_size=len(tokenizer), max_seq_len=max_seq_len
    )
    export_hf(LlamaLM(model_cfg), out_dir, tokenizer)
    return str(out_dir)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    train: list[Any]  # encoded training examples (SFT: packed windows when packing)
    val: list[Any]  # encoded validation examples (never packed: exact per-example masks)
    collate_train: Any
    collate_eval: Any
    labels: list[str] | None = None  # classify
    class_weights: Tensor | None = None


def read_sft(cfg: FinetuneConfig) -> tuple[list, list]:
    from .data.builtin import BUILTIN_SFT

    conversations = sft_data.load_conversations(cfg.data.path or BUILTIN_SFT)
    if cfg.data.val_path:
        return conversations, sft_data.load_conversations(cfg.data.val_path)
    return sft_data.holdout(conversations, cfg.data.val_fraction, cfg.train.seed)


def read_classify(cfg: FinetuneConfig) -> tuple[list, list, cls_data.LabelMap]:
    from .data.builtin import BUILTIN_CLASSIFY

    keys = {"text_key": cfg.data.text_key, "label_key": cfg.data.label_key}
    rows = cls_data.load_rows(cfg.data.path or BUILTIN_CLASSIFY, **keys)
    if cfg.data.val_path:
        train, val = rows, cls_data.load_rows(cfg.data.val_path, **keys)
    else:
        train, val = cls_data.split_rows(rows, cfg.data.val_fraction, cfg.train.seed)
    label_map = cls_data.LabelMap.infer([r[cfg.data.label_key] for r in train])
    for i, row in enumerate(val):  # fail before the model loads: the head has no output for a new label
        label_map.encode(row[cfg.data.label_key], where=f"{cfg.data.val_path or 'validation split'} row {i + 1}")
    return train, val, label_map


def encode_data(cfg: FinetuneConfig, raw: tuple, tokenizer: Any, max_len: int) -> TaskData:
    pad_id = tokenizer.pad_token_id
    if cfg.task == "sft":
        train_conv, val_conv = raw
        train, dropped = sft_data.encode_conversations(train_conv, tokenizer, max_len, source="train")
        val = sft_data.encode_conversations(val_conv, tokenizer, max_len, source="val")[0] if val_conv else []
        if dropped:
            print(f"notice: {dropped} training examples dropped: the prompt fills data.max_seq_len={max_len}")
        if cfg.data.packing:
            train = sft_data.pack_examples(train, max_len)
        return TaskData(
            train=train,
            val=val,
            collate_train=sft_data.sft_collate(pad_id, max_len, cfg.data.packing),
            collate_eval=sft_data.sft_collate(pad_id, max_len, packing=False),
        )
    train_rows, val_rows, label_map = raw
    keys = {"text_key": cfg.data.text_key, "label_key": cfg.data.label_key}
    train = cls_data.encode_rows(train_rows, tokenizer, label_map, max_len, source="train", **keys)
    val = cls_data.encode_rows(val_rows, tokenizer, label_map, max_len, source="val", **keys) if val_rows else []
    collate = cls_data.classify_collate(pad_id)
    weights = cls_data.class_weights(train, len(label_map)) if cfg.class_weights else None
    return TaskData(train, val, collate, collate, labels=label_map.labels, class_weights=weights)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and sampling
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_sft(model: nn.Module, data: TaskData, batch_size: int, device, max_batches: int | None = None) -> dict:
    """Response loss (token-weighted mean CE over response tokens) and its perplexity."""
    meter = TokenLossMeter()
    for i, batch in enumerate(batches.iter_batches(data.val, batch_size, data.collate_eval)):
        if max_batches is not None and i >= max_batches:
            break
        batch = to_device(batch, device)
        loss = model(**batch).loss
        meter.update(float(loss), int((batch["labels"][:, 1:] != sft_data.IGNORE_INDEX).sum()))  # shifted targets
    return {"loss": meter.mean, "perplexity": perplexity(meter.mean), "tokens": meter.tokens}


def evaluate_classify(
    model: nn.Module, data: TaskData, batch_size: int, device, max_batches: int | None = None
) -> dict:
    """Loss plus accuracy, per-class and macro precision/recall/F1 and the confusion matrix."""
    val_batches = batches.iter_batches(data.val, batch_size, data.collate_eval)
    return evaluate_classifier(model, val_batches, data.labels, device, max_batches)


def reported_metrics(cfg: FinetuneConfig) -> tuple[str, ...]:
    """What every evaluation reports (train.early_stopping.metric and tune's objective name one)."""
    return LOSS_METRICS if cfg.task == "sft" else CLASSIFIER_METRICS


def make_sft_sampler(tokenizer: Any, cfg: FinetuneConfig, device: torch.device):
    """sample(model) -> completions of cfg.sample.prompts rendered with the SFT template (fork_rng: the training
    random stream is not touched by sampling)."""
    stop = sft_data.stop_token_ids(tokenizer)

    def sample(model: nn.Module) -> list[str]:
        texts = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.train.seed)
            for prompt in cfg.sample.prompts:
                ids = torch.tensor([sft_data.prompt_ids(prompt, tokenizer)], device=device)
                s = cfg.sample
                out = generate_ids(model, ids, tokenizer, s.max_new_tokens, s.temperature, s.top_k, None, stop)
                texts.append(prompt + " -> " + tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        return texts

    return sample


# ----------------------------------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------------------------------
def run(cfg: FinetuneConfig, dbg: DebugConfig | None = None) -> dict:
    """Fine-tune as configured; returns the final metrics (also in run_dir/metrics.json). Raises ConfigError."""
    dbg = dbg or DebugConfig()
    try:
        device = resolve_device(cfg.train.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_qlora(cfg.lora, device)  # before anything is read or loaded
    with training_run(cfg, dbg) as run:
        from .debug import effective_num_workers

        info, run_dir = run.info, run.run_dir
        base = resolve_base_model(cfg, dbg.debug)
        raw = read_sft(cfg) if cfg.task == "sft" else read_classify(cfg)  # data errors before the model loads
        labels = raw[2].labels if cfg.task == "classify" else None
        check_resume_labels(run.resume_from, labels)
        run.start(cfg)

        model, tokenizer, data, counts, base = build_model(cfg, run, base, raw, labels)

        run.save_config(cfg)
        if info.is_main and labels is not None:
            cls_data.LabelMap(labels).save(run_dir)

        evaluate_fn = evaluate_sft if cfg.task == "sft" else evaluate_classify
        bs = cfg.train.batch_size

        def evaluate(m: nn.Module, limit: int | None = cfg.train.eval_batches) -> dict[str, float]:
            return scalar_metrics(evaluate_fn(m, data, bs, info.device, limit))  # on train.eval_batches by default

        # An attached debugger would not stop in worker processes: effective_num_workers drops them to 0 with a notice.
        workers = effective_num_workers(cfg.data.num_workers)
        source = batches.ExampleBatches(
            data.train, bs, data.collate_train, seed=cfg.train.seed + info.rank, num_workers=workers
        )
        history = fit(
            model,
            source,
            cfg.train,
            run_dir,
            optim=cfg.optim,
            setup=run.setup,
            job=Job(
                evaluate=evaluate if data.val else None,
                validate=(lambda m: evaluate(m, None)) if data.val else None,
                metrics=reported_metrics(cfg),
                sample=make_sft_sampler(tokenizer, cfg, info.device) if cfg.task == "sft" else None,
                config=cfg,
                extra_state={"labels": labels, "task": cfg.task, "base_model": base},
                save_model=lambda m, d: save_adapter(m, d / ADAPTER_DIR),
            ),
        )

        result: dict[str, Any] = {}
        if info.is_main or is_sharded(model):  # a sharded model's forwards and gathers need every rank
            result = finish(cfg, run_dir, model, tokenizer, data, history, (base, counts), evaluate_fn, run.setup)
        barrier()
        return result if info.is_main else {}


def build_model(cfg: FinetuneConfig, run: RunContext, base: str | None, raw: tuple, labels: list[str] | None):
    """The base model (a tiny one pretrained here when none is named) with LoRA, its tokenizer and the encoded data;
    the model on the run's device, wrapped (DDP, compile) as configured. Returns ``model, tokenizer, data,
    (trainable, total) parameters, base``."""
    info, run_dir = run.info, run.run_dir
    if base is None:
        base = build_tiny_base(run_dir / "base", cfg.data.max_seq_len) if info.is_main else None
        barrier()
        base = base or str(run_dir / "base")
    model, tokenizer = load_model(
        base, cfg.task, labels=labels, settings=cfg.lora, trust_remote_code=cfg.trust_remote_code
    )
    max_len = max_input_len(model, cfg.data.max_seq_len)
    if max_len < cfg.data.max_seq_len:
        print(f"notice: data.max_seq_len={cfg.data.max_seq_len} -> {max_len} (the model's max_position_embeddings)")
    data = encode_data(cfg, raw, tokenizer, max_len)

    model = apply_lora(model, cfg.lora, cfg.task)
    trainable, total = counts = count_parameters(model)
    if info.is_main:
        print(f"model: {base}  trainable {trainable:,} / {total:,} parameters ({100 * trainable / total:.2f}%)")
        unit = "windows" if cfg.data.packing else "examples"
        print(f"data: {len(data.train)} training {unit}, {len(data.val)} validation examples")
    if cfg.task == "classify":
        model = ClassifierWithLoss(model, data.class_weights)
    if cfg.lora.qlora:  # a 4-bit model is placed by its device_map; bitsandbytes' layers stay eager
        print("compile: off (QLoRA: bitsandbytes 4-bit layers run eager)", file=sys.stderr)
        model = wrap_fsdp(model, info, run.setup.dtype) if run.parallel == "fsdp" else wrap_ddp(model, info)
    else:
        model = run.wrap(model.to(info.device), cfg.train.compile)
    return model, tokenizer, data, counts, base


def finish(cfg, run_dir, model, tokenizer, data, history, origin, evaluate_fn, setup) -> dict:
    """Save the adapter (+ tokenizer, label map), evaluate on the whole validation set (under the training run's
    autocast, as fit's evaluations were), write metrics, merge. ``origin``: (base model, (trainable, total)
    parameters). Rank 0 writes; a sharded model runs this on every rank (its forwards and gathers are collective)."""
    (base, counts), main = origin, get_rank() == 0
    adapter_dir = run_dir / ADAPTER_DIR
    save_adapter(model, adapter_dir)
    stop_ids = sft_data.stop_token_ids(tokenizer) if cfg.task == "sft" else None
    if main:
        tokenizer.save_pretrained(str(adapter_dir))
        if stop_ids:  # for peft users: the base model's generation config knows eos, not the template's end of turn
            save_stop_ids(adapter_dir, stop_ids)
        if data.labels is not None:
            cls_data.LabelMap(data.labels).save(adapter_dir)

    raw_model = unwrap(model)
    result: dict[str, Any] = {
        "task": cfg.task,
        "base_model": base,
        **history_result(history),
        "trainable_params": counts[0],
        "total_params": counts[1],
    }
    if data.val:
        raw_model.eval()
        device = next(raw_model.parameters()).device
        with setup.autocast:
            result["eval"] = evaluate_fn(raw_model, data, cfg.train.batch_size, device)
        raw_model.train()
    if main:
        report_final(run_dir, result, cfg.train.logger)
    if cfg.merge and main:
        peft_model = peft_model_of(model)
        if is_sharded(raw_model):  # rank 0 merges an unsharded copy on its CPU: the base once, plus the adapter
            kwargs = {"labels": data.labels, "settings": cfg.lora, "trust_remote_code": cfg.trust_remote_code}
            peft_model = load_adapter(load_model(base, cfg.task, **kwargs)[0], adapter_dir)
        out = merge_and_save(peft_model, run_dir / MERGED_DIR, tokenizer, stop_ids)
        print(f"merged model written to {out}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    run_cli(FinetuneConfig, run, argv, prog=f"python -m {__package__}.finetune")


if __name__ == "__main__":
    main()
