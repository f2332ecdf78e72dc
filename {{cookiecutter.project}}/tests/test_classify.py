"""Classification data: CSV/JSONL reading, label map, clear errors, class weights, collation."""

from __future__ import annotations

import json

import pytest
import torch

from {{ cookiecutter.package }}.config import ConfigError
from {{ cookiecutter.package }}.data import classify
from {{ cookiecutter.package }}.data.builtin import BUILTIN_CLASSIFY


def _write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "".join(f"{t},{lab}\n" for t, lab in rows), encoding="utf-8")
    return path


def test_csv_and_jsonl_rows_and_label_map(tmp_path, ft_tokenizer):
    csv_path = _write_csv(tmp_path / "d.csv", [("good film", "pos"), ("bad film", "neg"), ("fine", 1)])
    rows = classify.load_rows(csv_path)
    assert [r["label"] for r in rows] == ["pos", "neg", "1"]  # labels are strings
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "y": lab}) + "\n" for t, lab in [("a b", 0), ("c d", 1)]))
    rows_j = classify.load_rows(jsonl, text_key="body", label_key="y")
    label_map = classify.LabelMap.infer([r["y"] for r in rows_j])
    assert label_map.labels == ["0", "1"] and label_map.id2label == {0: "0", 1: "1"}
    examples = classify.encode_rows(rows_j, ft_tokenizer, label_map, 8, text_key="body", label_key="y")
    assert [e["label"] for e in examples] == [0, 1]
    label_map.save(tmp_path)
    assert classify.LabelMap.load(tmp_path).labels == ["0", "1"]


def test_missing_columns_are_one_line_errors(tmp_path):
    csv_path = _write_csv(tmp_path / "d.csv", [("x", "y")], header="sentence,label")
    with pytest.raises(ConfigError, match=r"missing column\(s\) \['text'\]; the header has \['sentence', 'label'\]"):
        classify.load_rows(csv_path)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"d.jsonl:1: missing key\(s\) \['label'\]"):
        classify.load_rows(jsonl)


@pytest.mark.parametrize("content, name", [("", "e.csv"), ("text,label\n", "h.csv"), ("\n\n", "e.jsonl")])
def test_empty_dataset_is_an_error(tmp_path, content, name):
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match="no examples"):
        classify.load_rows(tmp_path / name)


def test_unknown_label_at_eval_and_too_few_labels(ft_tokenizer):
    label_map = classify.LabelMap.infer(["pos", "neg"])
    with pytest.raises(ConfigError, match=r"unknown label 'meh'.*\['neg', 'pos'\]"):
        classify.encode_rows([{"text": "so so", "label": "meh"}], ft_tokenizer, label_map, 8, source="val")
    with pytest.raises(ConfigError, match="at least 2"):
        classify.LabelMap.infer(["pos", "pos"])


def test_class_weights_are_balanced_inverse_frequency():
    examples = [{"label": 0}] * 6 + [{"label": 1}] * 2
    w = classify.class_weights(examples, 2)
    torch.testing.assert_close(w, torch.tensor([8 / (2 * 6), 8 / (2 * 2)]))
    assert classify.class_weights([{"label": 0}, {"label": 1}], 2).tolist() == [1.0, 1.0]


def test_collate_pads_right_and_keeps_class_ids():
    batch = classify.classify_collate(pad_id=1)([{"input_ids": [5, 6, 7], "label": 2}, {"input_ids": [8], "label": 0}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [2, 0]


def test_builtin_set_uses_its_split_column():
    rows = classify.load_rows(BUILTIN_CLASSIFY)
    train, val = classify.split_rows(rows, 0.1, seed=0)
    assert len(train) + len(val) == len(rows) and 0 < len(val) < len(train)
    assert all(r["split"] == "train" for r in train) and all(r["split"] == "val" for r in val)
    assert classify.LabelMap.infer([r["label"] for r in train]).labels == ["comedy", "history", "tragedy"]
    # Without a split column: a seeded holdout.
    plain = [{"text": str(i), "label": str(i % 2)} for i in range(20)]
    a, b = classify.split_rows(plain, 0.25, seed=3)
    assert len(b) == 5 and classify.split_rows(plain, 0.25, seed=3) == (a, b)
