"""Sample text: ``python -m <package>.generate --prompt "MACBETH."`` [--adapter runs/finetune-sft/adapter].

One path for every model: the model is a transformers directory (by default what ``pretrain`` exported,
``runs/pretrain/hf``; a fine-tune's merged ``hf/``; any local causal LM) or a run directory holding one, loaded with
``AutoModelForCausalLM``; ``--adapter`` puts a LoRA adapter from ``finetune`` on top (peft), and transformers'
``generate`` samples. With an SFT adapter the prompt is rendered with the same chat / plain template as in training
(``--chat always`` / ``never`` decides instead); the template's end-of-turn token stops generation.

    python -m <package>.generate --prompt "MACBETH." --temperature 0.8 --top_k 50
    python -m <package>.generate --adapter runs/finetune-sft/adapter --prompt "Who speaks these lines? ..."
    python -m <package>.generate --debug --prompt "MACBETH."      # reads the --debug pretrain run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from .cli import run_cli
from .config import ConfigError, DebugConfig
from .config.generate import GenerateConfig
from .data import sft as sft_data
from .lora import generate_ids, load_adapter, load_model, pretrain_export_dir
from .train.distributed import resolve_device


def resolve_model(cfg: GenerateConfig, debug: bool) -> str:
    """``--model``, or else what ``pretrain`` exported (its ``--debug`` run's under ``--debug``)."""
    if cfg.model is not None:
        return cfg.model
    export = pretrain_export_dir(debug)
    if (export / "config.json").is_file():
        return str(export)
    how = "--debug" if debug else "--config configs/pretrain.yaml"
    raise ConfigError(
        f"{export} not found: run pretrain first (python -m {__package__}.pretrain {how}) or pass --model DIR"
    )


def adapter_task(adapter_dir: str | Path) -> str | None:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"adapter not found: {adapter_dir} has no adapter_config.json")
    return json.loads(path.read_text(encoding="utf-8")).get("task_type")


def load_for_generation(cfg: GenerateConfig, debug: bool = False) -> tuple[Any, Any]:
    """(model in eval mode on its device, tokenizer); the adapter's saved tokenizer wins when there is one."""
    model_path = resolve_model(cfg, debug)
    if cfg.adapter is not None and adapter_task(cfg.adapter) == "SEQ_CLS":
        raise ConfigError(f"{cfg.adapter} is a classification adapter: generate needs an SFT (causal LM) adapter")
    model, tokenizer = load_model(model_path, "sft", trust_remote_code=cfg.trust_remote_code)
    if cfg.adapter is not None:
        model = load_adapter(model, cfg.adapter)
        if (Path(cfg.adapter) / "tokenizer_config.json").is_file():
            from .data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(cfg.adapter, trust_remote_code=cfg.trust_remote_code)
    try:
        device = resolve_device(cfg.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return model.to(device).eval(), tokenizer


def complete(cfg: GenerateConfig, model: Any, tokenizer: Any, chat: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, new ids) for ``cfg.prompt``; the new ids end with the stop token when one came. With ``chat`` the
    prompt is rendered as in SFT and the template's end of turn stops, else the tokenizer's eos does."""
    if chat:
        ids = sft_data.prompt_ids(cfg.prompt, tokenizer)
        stop = sft_data.stop_token_ids(tokenizer)
    else:
        ids = tokenizer(cfg.prompt)["input_ids"]
        stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not ids:
        raise ConfigError("the prompt is empty")
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        out = generate_ids(model, input_ids, tokenizer, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, stop)
    return ids, out[0, len(ids) :].tolist()


def run(cfg: GenerateConfig, dbg: DebugConfig | None = None) -> str:
    """Generate one completion of ``cfg.prompt``; prints and returns the prompt + completion."""
    dbg = dbg or DebugConfig()
    from .debug import start_debugger

    start_debugger(dbg)
    model, tokenizer = load_for_generation(cfg, dbg.debug)
    chat = cfg.chat == "always" or (cfg.chat == "auto" and cfg.adapter is not None)
    _, new_ids = complete(cfg, model, tokenizer, chat)
    completion = tokenizer.decode(new_ids, skip_special_tokens=True)
    text = cfg.prompt + ("\n" if chat else "") + completion
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> None:
    run_cli(GenerateConfig, run, argv, prog=f"python -m {__package__}.generate", interrupted=None)


if __name__ == "__main__":
    sys.exit(main())
