"""LoRA (and QLoRA) through peft, for transformers models and for our own LlamaLM.

LoRA freezes the base weights W [out, in] and learns a low-rank update: y = W x + (alpha / r) * B A x with
A [r, in] and B [out, r], B initialised to zero so training starts from the base model exactly. Trainable
parameters per targeted linear: r * (in + out).

- Target modules: ``lora.target_modules`` = None picks the usual default for the architecture (peft's table:
  Llama ``q_proj, v_proj``; BERT ``query, value``; our LlamaLM uses HF Llama's names, so the same), a list of module
  names, or ``["all-linear"]`` for every linear layer except the output head.
- Models: :func:`load_model` loads a transformers directory or hub id (``AutoModelForCausalLM`` for SFT,
  ``AutoModelForSequenceClassification`` for classification; ``trust_remote_code`` off unless asked) or a
  pre-training run directory (its ``hf/`` export). :func:`apply_lora` works on those and on a bare
  :class:`~.model.lm.LlamaLM` (peft wraps any ``nn.Module``). :func:`pretrain_export_dir` is where ``pretrain``
  exports, the base model ``finetune`` and ``generate`` take by default; :func:`generate_ids` samples from any of
  these models, adapters on or merged (both entry points use it, and neither imports the other).
- QLoRA loads the base model in 4-bit NF4 with bitsandbytes, which needs CUDA: :func:`check_qlora` fails fast (one
  line) before anything is loaded on a machine without it.
- Outputs: ``save_pretrained`` of the peft model writes ``adapter_config.json`` + ``adapter_model.safetensors``;
  :func:`merge_and_save` folds the update into W (``merge_and_unload``) and writes a plain model directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .config import ConfigError, LoraSettings, parse_config
from .config.pretrain import PretrainConfig
from .model.lm import LlamaLM

Task = Literal["sft", "classify"]
ADAPTER_DIR = "adapter"  # in a fine-tune's run directory: the LoRA adapter, its tokenizer (and label map)
MERGED_DIR = "hf"  # with --merge: the base model with the adapter merged in, a standalone transformers model
ALL_LINEAR = "all-linear"
# Output heads are trained in full (classification) or left alone (the LM head): never LoRA targets.
HEAD_NAMES = ("lm_head", "score", "classifier")


# ----------------------------------------------------------------------------------------------------------------------
# Target modules
# ----------------------------------------------------------------------------------------------------------------------
def _linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the nn.Linear layers of ``model``, output heads excluded."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(part in HEAD_NAMES for part in name.split("."))
    ]


def default_target_modules(model: nn.Module) -> list[str]:
    """peft's per-architecture default (Llama: q_proj, v_proj; BERT: query, value; ...)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if isinstance(model, LlamaLM):
        return list(DEFAULTS["llama"])
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULTS:
        return list(DEFAULTS[model_type])
    raise ConfigError(
        f"no default LoRA target modules for model type {model_type!r}: set lora.target_modules "
        f"(e.g. [{ALL_LINEAR}] or some of {sorted({n.split('.')[-1] for n in _linear_names(model)})})"
    )


def resolve_target_modules(model: nn.Module, requested: list[str] | str | None) -> list[str]:
    """The module-name suffixes to adapt; unknown names are a ConfigError listing the model's linear layers."""
    if requested is None or (isinstance(requested, list) and not requested):
        return default_target_modules(model)
    names = [requested] if isinstance(requested, str) else list(requested)
    linear = _linear_names(model)
    suffixes = sorted({n.split(".")[-1] for n in linear})
    if [n.lower() for n in names] == [ALL_LINEAR]:
        return suffixes
    unknown = [n for n in names if not any(q == n or q.endswith("." + n) for q in linear)]
    if unknown:
        raise ConfigError(f"lora.target_modules {unknown} match no linear layer of the model; it has {suffixes}")
    return names


def lora_config(settings: LoraSettings, model: nn.Module, task: Task | None = "sft"):
    """peft.LoraConfig from our settings. task_type is left unset for a bare LlamaLM (a plain PeftModel wrapper)."""
    from peft import LoraConfig, TaskType

    task_type = None
    if not isinstance(model, LlamaLM) and task is not None:
        task_type = TaskType.CAUSAL_LM if task == "sft" else TaskType.SEQ_CLS  # SEQ_CLS also trains the head
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=resolve_target_modules(model, settings.target_modules),
        bias="none",
        task_type=task_type,
    )


def apply_lora(model: nn.Module, settings: LoraSettings, task: Task | None = "sft") -> nn.Module:
    """Wrap ``model`` with fresh LoRA adapters: only the adapters (and a classification head) stay trainable."""
    from peft import get_peft_model

    if hasattr(model, "peft_config"):
        raise ValueError("the model already has LoRA adapters: wrapping it again would stack a second set")
    return get_peft_model(model, lora_config(settings, model, task))


def adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """A saved adapter's adapter_config.json: its ``task_type`` (``CAUSAL_LM``, ``SEQ_CLS``) and the base model it
    was trained on (``base_model_name_or_path``, as the fine-tune named it)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"adapter not found: {adapter_dir} has no adapter_config.json")
    return json.loads(path.read_text(encoding="utf-8"))


def load_adapter(model: nn.Module, adapter_dir: str | Path, *, trainable: bool = False) -> nn.Module:
    """Put the saved adapter of ``adapter_dir`` (adapter_config.json + adapter_model.safetensors) on ``model``."""
    from peft import PeftModel

    adapter_config(adapter_dir)  # one line when it is missing
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def max_input_len(model: nn.Module, requested: int) -> int:
    """``requested``, or the model's ``max_position_embeddings`` when that is smaller: the length texts are cut to."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(requested, limit) if limit else requested


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ----------------------------------------------------------------------------------------------------------------------
# QLoRA
# ----------------------------------------------------------------------------------------------------------------------
def check_qlora(settings: LoraSettings, device: torch.device | str | None = None) -> None:
    """Fail with one line unless 4-bit loading can work here (CUDA device + bitsandbytes). Call before any work."""
    if not settings.qlora:
        return
    on_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if not on_cuda:
        raise ConfigError(
            "lora.qlora=true needs a CUDA GPU (bitsandbytes 4-bit kernels); on this machine use --lora.qlora false"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError('lora.qlora=true needs bitsandbytes: pip install -e ".[qlora]"') from None


def _quantization_kwargs(settings: LoraSettings) -> dict[str, Any]:
    if not settings.qlora:
        return {}
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",  # the QLoRA paper's normal-float 4-bit
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            # the packed 4-bit weights in bf16 tensors, not uint8: FSDP2 shards them like the other bf16 weights
            # (transformers' FSDP-QLoRA recipe); one process or DDP computes the same either way
            bnb_4bit_quant_storage=torch.bfloat16,
        ),
        "device_map": {"": torch.cuda.current_device()},
    }


# ----------------------------------------------------------------------------------------------------------------------
# Loading base models
# ----------------------------------------------------------------------------------------------------------------------
def pretrain_defaults(debug: bool) -> PretrainConfig:
    """What a bare ``pretrain`` (``pretrain --debug``) run is configured with."""
    return parse_config(PretrainConfig, ["--debug"] if debug else [])[0]


def pretrain_export_dir(debug: bool) -> Path:
    """Where ``pretrain`` (with or without ``--debug``) writes its transformers export: the base model ``finetune``
    and ``generate`` take when none is named."""
    p = pretrain_defaults(debug)
    return Path(p.out_dir) / p.name / "hf"


def resolve_model_path(name_or_path: str | Path) -> str:
    """A transformers model directory, a pre-training run directory (-> its hf/ export), or a hub id.

    A path that does not exist and is not shaped like a hub id (``name`` or ``org/name``) is a ConfigError (one
    line); a hub id that cannot be fetched fails in :func:`load_model`, also in one line.
    """
    from .data.tokenizer import looks_like_hub_id

    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        if (path / "hf" / "config.json").is_file():  # a pretrain run directory
            return str(path / "hf")
        raise ConfigError(f"{path}: not a transformers model directory (no config.json, no hf/config.json)")
    if path.exists():
        raise ConfigError(f"{path}: expected a model directory, got a file")
    if looks_like_hub_id(text):
        return text
    raise ConfigError(f"model path does not exist: {text}")


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}  # renamed in 4.56


def load_model(
    name_or_path: str | Path,
    task: Task,
    *,
    labels: list[str] | None = None,
    settings: LoraSettings | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for fine-tuning: a causal LM for ``sft``, a sequence classifier with ``len(labels)``
    outputs for ``classify`` (a causal LM checkpoint gets a new, randomly initialised head). No adapters yet."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .data.tokenizer import load_tokenizer

    settings = settings or LoraSettings()
    check_qlora(settings)
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **_dtype_kwargs(dtype)}
        kwargs.update(_quantization_kwargs(settings))
        if task == "sft":
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            if not labels:
                raise ConfigError("classification needs the label list to size the head")
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                pad_token_id=tokenizer.pad_token_id,  # the head pools the last non-pad token
                **kwargs,
            )
    except (OSError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        first = " ".join(str(err).split())[:300]
        raise ConfigError(f"could not load model {path!r}: {first}") from err
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if settings.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model, tokenizer


def merge_and_save(
    peft_model: nn.Module, out_dir: str | Path, tokenizer: Any = None, stop_ids: list[int] | None = None
) -> Path:
    """Fold the adapters into the base weights and save a standalone model directory (transformers format).

    ``stop_ids`` (SFT: :func:`~.data.sft.stop_token_ids`, eos and the chat template's end of turn) become
    generation_config.json's ``eos_token_id``, so that transformers' ``generate`` (and the serving tools that read
    that file) stop a reply where ours does. Modifies ``peft_model``'s base model in place (the merged weights); call
    it last.
    """
    out = Path(out_dir)
    merged = peft_model.merge_and_unload()
    if isinstance(merged, LlamaLM):
        from .model.hf import export_hf

        export_hf(merged, out, tokenizer)
    else:
        merged.save_pretrained(str(out))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))  # with its chat template (chat_template.jinja)
    if stop_ids:
        save_stop_ids(out, stop_ids)
    return out


def save_stop_ids(model_dir: Path, stop_ids: list[int]) -> None:
    """Every id that ends a reply as generation_config.json's eos_token_id (a list where there are several, as in
    Llama 3 Instruct's [<|end_of_text|>, <|eot_id|>]); the rest of the saved generation config is kept."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(str(model_dir))
    except OSError:  # the model saved none
        config = GenerationConfig()
    config.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else list(stop_ids)
    config.save_pretrained(str(model_dir))


# ----------------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------------
def generate_ids(model, input_ids, tokenizer, max_new_tokens, temperature, top_k, top_p, stop_ids) -> torch.Tensor:
    """transformers' generate (works on peft-wrapped and merged models alike): [1, T] -> [1, T + new]."""
    sampling = temperature > 0
    kwargs: dict[str, Any] = {"do_sample": sampling}
    if sampling:
        kwargs.update(temperature=temperature, top_k=top_k or 0, top_p=top_p if top_p is not None else 1.0)
    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids or None,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
