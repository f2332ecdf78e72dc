"""ExampleBatches (the training source of fine-tuning, vision and speech) and its augmentation hook."""

from __future__ import annotations

import multiprocessing
import pickle

import torch

from {{ cookiecutter.package }}.data import batches, classify, sft


def test_example_batches_resume_exactly():
    items = [{"input_ids": [i + 4], "labels": [i + 4]} for i in range(10)]
    a = batches.ExampleBatches(items, 3, lambda xs: sft.pad_batch(xs, 1), seed=7)
    for _ in range(5):  # crosses an epoch boundary
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()["input_ids"].tolist() for _ in range(4)]
    b = batches.ExampleBatches(items, 3, lambda xs: sft.pad_batch(xs, 1), seed=7)
    b.load_state_dict(state)
    assert [b.next_batch()["input_ids"].tolist() for _ in range(4)] == expected
    epoch = batches.ExampleBatches(items, 10, lambda xs: sft.pad_batch(xs, 1)).next_batch()["input_ids"]
    assert sorted(epoch[:, 0].tolist()) == [i + 4 for i in range(10)]  # an epoch visits every item once


def _worker_items():
    return [{"input_ids": [i + 4] * (1 + i % 3), "labels": [i + 4] * (1 + i % 3)} for i in range(10)]


def _take(source, n):
    return [{k: v.tolist() for k, v in source.next_batch().items()} for _ in range(n)]


def test_example_batches_with_workers_match_the_main_process():
    collate = sft.sft_collate(pad_id=1, max_len=8, packing=False)
    plain = batches.ExampleBatches(_worker_items(), 3, collate, seed=7)
    workers = batches.ExampleBatches(_worker_items(), 3, collate, seed=7, num_workers=2)
    for _ in range(9):  # 4 batches an epoch: crosses two epoch boundaries
        assert _take(workers, 1) == _take(plain, 1)
        assert workers.state_dict() == plain.state_dict()  # counts consumed batches, not prefetched ones
    assert workers.state_dict() == {"epoch": 2, "pos": 3}
    workers.close()


def test_example_batches_with_workers_resume_exactly_and_stop_their_workers():
    before = set(multiprocessing.active_children())
    collate = sft.sft_collate(pad_id=1, max_len=8, packing=False)
    a = batches.ExampleBatches(_worker_items(), 3, collate, seed=7, num_workers=2)
    _take(a, 6)  # mid-epoch 1
    state = a.state_dict()
    expected = _take(a, 5)
    b = batches.ExampleBatches(_worker_items(), 3, collate, seed=7, num_workers=2)
    _take(b, 2)  # its workers have prefetched from the old position: load_state_dict must discard that
    b.load_state_dict(state)
    assert _take(b, 5) == expected
    c = batches.ExampleBatches(_worker_items(), 3, collate, seed=7)  # a checkpoint resumes with any num_workers
    c.load_state_dict(state)
    assert _take(c, 5) == expected
    a.close()
    b.close()
    assert set(multiprocessing.active_children()) <= before  # no worker process left behind


def _jitter(batch, generator):
    """An augmentation that draws from the generator and leaves labels alone."""
    noise = torch.randint(0, 1000, batch["input_ids"].shape, generator=generator)
    return {**batch, "input_ids": batch["input_ids"] * 1000 + noise}


def test_augment_is_seeded_by_position_resumes_exactly_and_ignores_workers():
    collate = sft.sft_collate(pad_id=1, max_len=8, packing=False)
    a = batches.ExampleBatches(_worker_items(), 3, collate, seed=7, augment=_jitter)
    first = _take(a, 6)
    state = a.state_dict()
    expected = _take(a, 5)
    plain = _take(batches.ExampleBatches(_worker_items(), 3, collate, seed=7), 11)
    for got, clean in zip(first + expected, plain, strict=True):
        assert got["labels"] == clean["labels"]  # the labels are never touched
        assert [[v // 1000 for v in row] for row in got["input_ids"]] == clean["input_ids"]
    draws = [[v % 1000 for v in b["input_ids"][0]] for b in first + expected]
    assert len({tuple(d) for d in draws}) == len(draws)  # every batch gets its own draw
    b = batches.ExampleBatches(_worker_items(), 3, collate, seed=7, augment=_jitter, num_workers=2)
    b.load_state_dict(state)
    assert _take(b, 5) == expected  # the position is the whole random state, with or without workers
    b.close()
    other = batches.ExampleBatches(_worker_items(), 3, collate, seed=8, augment=_jitter)
    assert _take(other, 1) != _take(batches.ExampleBatches(_worker_items(), 3, collate, seed=7, augment=_jitter), 1)


def test_collates_pickle_for_spawned_workers():
    # Under the spawn/forkserver start methods every worker unpickles the collate function.
    examples = _worker_items()[:3]
    padded = (sft.sft_collate(1, 8, packing=False), examples)
    packed = (sft.sft_collate(1, 8, packing=True), sft.pack_examples(examples, 8))
    for collate, batch in (padded, packed):
        again = pickle.loads(pickle.dumps(collate))
        for key, value in collate(batch).items():
            assert torch.equal(again(batch)[key], value), key
    rows = [{"input_ids": [5, 6], "label": 1}, {"input_ids": [7], "label": 0}]
    again = pickle.loads(pickle.dumps(classify.classify_collate(pad_id=1)))
    assert again(rows)["input_ids"].tolist() == [[5, 6], [7, 1]]
