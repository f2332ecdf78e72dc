"""``python -m <package>.generate``: its config (no training, no run directory, no ``--debug`` profile)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import DEMO_PROMPT, SEED, Auto, Sampling


@dataclass
class GenerateConfig(Sampling):
    """``python -m <package>.generate``: sample text from a trained model."""

    debug_section = None  # --debug takes no profile here: it only picks the debug pre-training run's model
    # a transformers causal LM directory or hub id, or a run directory holding hf/; None = what `pretrain` exported
    # (its --debug run's under --debug)
    model: str | None = None
    adapter: str | None = None  # optional LoRA adapter directory (finetune's run_dir/adapter) applied on `model`
    chat: Auto = "auto"  # render the prompt with the SFT chat / plain template; auto = when an adapter is given
    prompt: str = DEMO_PROMPT
    max_new_tokens: int = 128
    top_p: float | None = None  # nucleus sampling: the smallest set of tokens holding this much probability
    seed: int = SEED
    device: str = "auto"
    trust_remote_code: bool = False
