"""metrics.py against scikit-learn on the same predictions (ours are plain torch, sklearn is the reference)."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn import metrics as skm

from {{ cookiecutter.package }}.metrics import (
    TokenLossMeter,
    classification_metrics,
    confusion_matrix,
    format_confusion_matrix,
    perplexity,
)

LABELS = ["a", "b", "c", "d"]


def _predictions(seed: int = 0, n: int = 200, right: float = 0.6) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    y_true = torch.randint(0, 4, (n,), generator=g)
    # A share `right` correct, the rest noise, and class 3 is never predicted (its precision is 0/0 -> 0).
    y_pred = torch.where(torch.rand(n, generator=g) < right, y_true, torch.randint(0, 3, (n,), generator=g))
    y_pred = torch.where(y_pred == 3, torch.zeros_like(y_pred), y_pred)
    return y_true.tolist(), y_pred.tolist()


@pytest.mark.parametrize("seed, right", [(0, 0.6), (1, 0.9), (2, 0.1)])  # 0.1: precision + recall < 1 for F1
def test_classification_metrics_equal_sklearn(seed, right):
    y_true, y_pred = _predictions(seed, right=right)
    ours = classification_metrics(y_true, y_pred, LABELS)
    labels = list(range(4))
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    mp, mr, mf, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)

    assert ours["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    assert ours["macro_precision"] == pytest.approx(mp, abs=1e-12)
    assert ours["macro_recall"] == pytest.approx(mr, abs=1e-12)
    assert ours["macro_f1"] == pytest.approx(mf, abs=1e-12)
    assert ours["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12)
    for i, label in enumerate(LABELS):
        per = ours["per_class"][label]
        assert per["precision"] == pytest.approx(p[i], abs=1e-12)
        assert per["recall"] == pytest.approx(r[i], abs=1e-12)
        assert per["f1"] == pytest.approx(f[i], abs=1e-12)
        assert per["support"] == s[i]
    assert ours["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert ours["per_class"]["d"]["precision"] == 0.0  # never predicted
    assert ours["num_examples"] == len(y_true)


def test_confusion_matrix_accepts_tensors_and_rejects_out_of_range():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 2, 1, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="class ids"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="items"):
        confusion_matrix([0, 1], [0], 3)


def test_perplexity_and_token_weighted_loss():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e6) == pytest.approx(math.exp(50.0))  # capped, not inf
    assert math.isnan(perplexity(float("nan")))
    meter = TokenLossMeter()
    meter.update(1.0, 1)
    meter.update(4.0, 3)  # a per-batch mean would say 2.5
    assert meter.mean == pytest.approx((1.0 + 12.0) / 4)
    assert math.isnan(TokenLossMeter().mean)


def test_format_confusion_matrix_rows_are_true_labels():
    text = format_confusion_matrix([[5, 1], [0, 7]], ["neg", "pos"])
    lines = text.splitlines()
    assert lines[0].split() == ["true\\pred", "neg", "pos"]
    assert lines[1].split() == ["neg", "5", "1"]
    assert lines[2].split() == ["pos", "0", "7"]
