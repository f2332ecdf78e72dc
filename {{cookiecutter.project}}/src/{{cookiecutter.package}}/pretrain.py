"""Pre-train LlamaLM from scratch: ``python -m <package>.pretrain --config configs/pretrain.yaml [--options]``.

With no options it runs offline on the embedded Shakespeare corpus: trains a BPE tokenizer (cached), packs the
tokens (cached), trains, evaluates (loss, perplexity) and prints samples every ``train.eval_every`` steps,
checkpoints into ``runs/<name>/checkpoints`` and finally exports a transformers model to ``runs/<name>/hf`` that
``finetune`` and ``generate`` load.

    python -m <package>.pretrain --config configs/pretrain.yaml --debug        # tiny: < 1 min on a laptop CPU
    python -m <package>.pretrain --config configs/pretrain.yaml --train.max_steps 20 --train.resume auto
    python -m <package>.pretrain --debug --debugpy 5678 --wait-for-client      # attach VS Code, then step
    python -m <package>.pretrain --data.source "data/*.parquet" --data.prepare_only true   # tokenize, then torchrun
    torchrun --nproc_per_node=2 -m <package>.pretrain --config configs/pretrain.yaml
    torchrun --nproc_per_node=8 -m <package>.pretrain --config configs/pretrain.yaml --train.parallel fsdp  # sharded

Exit codes: 0 done, 2 bad input (config, data source, vocab size, existing run), 1 non-finite loss.
"""

from __future__ import annotations

from typing import Any

import torch

from .cli import run_cli
from .config import ConfigError, DebugConfig, SampleConfig
from .config.pretrain import PretrainConfig
from .metrics import LOSS_METRICS
from .runtime import training_run
from .train.distributed import barrier, is_sharded, unwrap
from .train.logger import history_result
from .train.loop import Job, evaluate_loss, fit
from .train.sharded import full_state_dict


def make_sampler(tokenizer: Any, cfg: SampleConfig, device: torch.device, seed: int):
    """``sample(model) -> [text per prompt]`` for fit(); its own generator so sampling never shifts training RNG."""

    def sample(model: torch.nn.Module) -> list[str]:
        generator = torch.Generator(device=device).manual_seed(seed)
        max_len = model.config.max_seq_len
        texts = []
        for prompt in cfg.prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -max_len + 1 :]
            new = min(cfg.max_new_tokens, max_len - ids.shape[1])  # rotary table covers max_seq_len positions
            out = model.generate(
                ids.to(device),
                max_new_tokens=new,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                eos_token_id=tokenizer.eos_token_id,
                generator=generator,
            )
            texts.append(tokenizer.decode(out[0].tolist(), skip_special_tokens=True))
        return texts

    return sample


def reported_metrics(cfg: PretrainConfig) -> tuple[str, ...]:
    """What every evaluation reports (train.early_stopping.metric and tune's objective name one)."""
    return LOSS_METRICS


def prepare_data(cfg: PretrainConfig, is_main: bool):
    """The tokenizer and the packed token shards: rank 0 trains and packs, the other ranks then read its cache."""
    from .data.corpus import prepare_corpus

    def prepare(log):
        try:
            d = cfg.data
            return prepare_corpus(
                d.source,
                tokenizer=d.tokenizer,
                vocab_size=d.vocab_size or cfg.model.vocab_size,
                cache_dir=d.cache_dir,
                val_fraction=d.val_fraction,
                train_sample_bytes=d.train_sample_bytes,
                log=log,
                **{k: getattr(d, k) for k in ("text_key", "subset", "split", "streaming", "revision")},
            )
        except (FileNotFoundError, ValueError, OSError) as err:
            raise ConfigError(f"data: {err}") from err

    corpus = prepare(print) if is_main else None
    barrier()
    if corpus is None:
        corpus = prepare(None)
    if len(corpus.tokenizer) > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({len(corpus.tokenizer)} tokens): set --model.vocab_size {len(corpus.tokenizer)} or larger"
        )
    return corpus


def done_line(history: list[dict], run_dir) -> str:
    """The closing line: steps, the last training loss, and the evaluation of the weights the run ends with (the
    best checkpoint's with early stopping, which the line then names)."""
    last, weights = history[-1], history_result(history).get("weights")
    final = next(r for r in history if r["step"] == last.get("weights_step", last["step"]))
    evals = "".join(f"  eval {k[5:]} {final[k]:.4f}" for k in ("eval_loss", "eval_perplexity") if k in final)
    weights = f"  weights {weights}" if weights else ""
    return f"done: step {last['step']}  train loss {last['loss']:.4f}{evals}{weights}  run dir {run_dir}"


def run(cfg: PretrainConfig, dbg: DebugConfig | None = None) -> list[dict]:
    """Pre-train as configured; returns fit()'s per-step metrics. Raises ConfigError for bad input."""
    from .data.corpus import EvalWindows, TokenWindows
    from .model.lm import LlamaLM

    dbg = dbg or DebugConfig()
    if cfg.data.prepare_only:  # no run directory, no model: the cache a training run then reuses
        prepare_data(cfg, is_main=True)
        return []
    with training_run(cfg, dbg) as run:
        info, run_dir = run.info, run.run_dir
        run.start(cfg)

        corpus = prepare_data(cfg, info.is_main)

        run.save_config(cfg)
        if info.is_main:
            corpus.tokenizer.save_pretrained(str(run_dir / "tokenizer"))

        model = LlamaLM(cfg.model).to(info.device)
        if info.is_main:
            print(f"model: {model.num_params(non_embedding=False) / 1e6:.2f}M parameters on {info.device}", flush=True)
        model = run.wrap(model, cfg.train.compile, fullgraph=True)

        seq_len, batch = cfg.data.seq_len, cfg.train.batch_size
        rank_args = {"rank": info.rank, "world_size": info.world_size}
        try:
            train_source = TokenWindows(
                corpus.train, batch, seq_len, mode=cfg.data.sampling, seed=cfg.train.seed, **rank_args
            )
            val_windows = EvalWindows(corpus.val, batch, seq_len, cfg.train.eval_batches, **rank_args)
            val_all = EvalWindows(corpus.val, batch, seq_len, None, **rank_args)  # the whole split, once
        except ValueError as err:
            raise ConfigError(f"data: {err}") from err

        history = fit(
            model,
            train_source,
            cfg.train,
            run_dir,
            optim=cfg.optim,
            setup=run.setup,
            job=Job(
                evaluate=lambda m: evaluate_loss(m, val_windows, info.device),
                validate=lambda m: evaluate_loss(m, val_all, info.device),
                metrics=reported_metrics(cfg),
                sample=make_sampler(corpus.tokenizer, cfg.sample, info.device, cfg.train.seed),
                config=cfg,
            ),
        )

        if cfg.export_hf:
            from .model.hf import export_hf

            # a sharded model is gathered onto rank 0's CPU, tensor by tensor (every rank sends its shards)
            weights = full_state_dict(model) if is_sharded(model) else None
            if info.is_main:
                out = export_hf(unwrap(model), run_dir / "hf", corpus.tokenizer, state_dict=weights)
                print(f"exported transformers model to {out}", flush=True)
        if info.is_main and history:
            print(done_line(history, run_dir), flush=True)
        barrier()
        return history


def main(argv: list[str] | None = None) -> None:
    run_cli(PretrainConfig, run, argv, prog=f"python -m {__package__}.pretrain")


if __name__ == "__main__":
    main()
