"""Evaluation metrics in plain Python/torch: perplexity for language modelling, accuracy / precision / recall / F1 /
confusion matrix for classification.

Conventions follow scikit-learn (the tests compare against it on the same predictions): the confusion matrix has
true classes in rows and predicted classes in columns; a class that is never predicted (or never present) gets
precision (or recall) 0.0 rather than NaN (sklearn's ``zero_division=0``); macro averages are unweighted means over
classes, and macro F1 is the mean of the per-class F1 scores (not the F1 of macro precision and recall).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

# exp(50) ~ 5e21: beyond this the number says nothing more than "the model is useless", and exp() would overflow.
_MAX_LOG_PPL = 50.0


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy in nats); capped at exp(50) so a diverged model reports a number, not inf."""
    if math.isnan(mean_loss):
        return float("nan")
    return math.exp(min(mean_loss, _MAX_LOG_PPL))


class TokenLossMeter:
    """Accumulates a token-weighted mean loss over batches of different sizes.

    Averaging per-batch means would over-weight short batches; summing ``loss * tokens`` is exact.
    """

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.tokens = 0

    def update(self, mean_loss: float, tokens: int) -> None:
        self.loss_sum += float(mean_loss) * int(tokens)
        self.tokens += int(tokens)

    @property
    def mean(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else float("nan")


def _as_long(values: Sequence[int] | Tensor) -> Tensor:
    t = values.detach().cpu() if isinstance(values, Tensor) else torch.tensor(list(values))
    return t.reshape(-1).long()


def confusion_matrix(y_true: Sequence[int] | Tensor, y_pred: Sequence[int] | Tensor, num_classes: int) -> Tensor:
    """[K, K] int64 counts: entry (i, j) = examples of true class i predicted as class j."""
    t, p = _as_long(y_true), _as_long(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.numel()} items but y_pred has {p.numel()}")
    if t.numel() and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"class ids must be in [0, {num_classes})")
    # One bincount over the flattened (true, pred) pair index instead of a Python loop.
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den == 0 (the division itself never sees a zero, so no NaN leaks through where)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def classification_metrics(
    y_true: Sequence[int] | Tensor, y_pred: Sequence[int] | Tensor, labels: Sequence[str]
) -> dict:
    """Accuracy, per-class and macro precision/recall/F1, and the confusion matrix, as plain JSON-ready data.

    ``labels[i]`` names class id ``i``. Returns::

        {"accuracy": float, "macro_precision": float, "macro_recall": float, "macro_f1": float,
         "per_class": {label: {"precision": ..., "recall": ..., "f1": ..., "support": int} },
         "confusion_matrix": [[int, ...], ...], "labels": [...],
         "num_examples": int}
    """
    k = len(labels)
    cm = confusion_matrix(y_true, y_pred, k).double()  # [K, K]
    tp = cm.diagonal()
    predicted = cm.sum(dim=0)  # column sums: how often each class was predicted
    support = cm.sum(dim=1)  # row sums: how often each class is the truth
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    n = int(cm.sum().item())
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_precision": float(precision.mean()) if k else 0.0,
        "macro_recall": float(recall.mean()) if k else 0.0,
        "macro_f1": float(f1.mean()) if k else 0.0,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": cm.long().tolist(),
        "labels": list(labels),
        "num_examples": n,
    }


def format_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """A fixed-width text table (rows = true, columns = predicted) for logs and TensorBoard."""
    width = max([len(str(v)) for row in matrix for v in row] + [len(s) for s in labels] + [len("true\\pred")])
    lines = [" ".join(s.rjust(width) for s in ["true\\pred", *labels])]
    for label, row in zip(labels, matrix, strict=True):
        lines.append(" ".join([label.rjust(width), *(str(v).rjust(width) for v in row)]))
    return "\n".join(lines)


# The numbers each kind of evaluation reports at every evaluation (what train.early_stopping.metric may name)
LOSS_METRICS = ("loss", "perplexity")  # language models: mean loss and its perplexity
CLASSIFIER_METRICS = ("loss", "accuracy", "macro_precision", "macro_recall", "macro_f1")


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The numbers fit() logs every evaluation (it averages them over ranks)."""
    keys = dict.fromkeys(LOSS_METRICS + CLASSIFIER_METRICS)
    return {k: float(metrics[k]) for k in keys if k in metrics}


def summary_line(result: dict, run_dir: Path) -> str:
    """The closing line of a fine-tuning or classifier run (``result["eval"]`` holds the final evaluation), with the
    confusion matrix as a table when there is one."""
    ev = result.get("eval") or {}
    parts = [f"done: step {result['steps']}"]
    if result.get("train_loss") is not None:
        parts.append(f"train loss {result['train_loss']:.4f}")
    if result.get("weights"):  # early stopping: which weights the final evaluation used
        parts.append(f"weights {result['weights']}")
    for key in ("loss", "perplexity", "accuracy", "macro_f1"):
        if key in ev:
            parts.append(f"eval {key} {ev[key]:.4f}")
    if "confusion_matrix" in ev:
        parts.append("\n" + format_confusion_matrix(ev["confusion_matrix"], ev["labels"]) + "\n")
    parts.append(f"run dir {run_dir}")
    return "  ".join(parts)
