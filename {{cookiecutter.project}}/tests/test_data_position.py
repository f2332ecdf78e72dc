"""TokenWindows' position is global: sequential sampling reads the same windows in every optimizer step whichever
way the global batch is split into ranks and micro-batches, and a resume on another world size continues at the
exact next window; random sampling resumes exactly on the same world size and re-derives the rank streams on
another one, saying so in one line."""

import json

import numpy as np
import pytest
import torch

from {{ cookiecutter.package }}.config import ConfigError
from {{ cookiecutter.package }}.data.corpus import TokenWindows

SEQ = 10
TOKENS = np.arange(1000, dtype=np.uint32)  # 100 windows; a row's first token is its start offset


def _ranks(world: int, batch: int, mode: str = "sequential", tokens: np.ndarray = TOKENS) -> list[TokenWindows]:
    return [TokenWindows(tokens, batch, SEQ, mode=mode, seed=5, rank=r, world_size=world) for r in range(world)]


def _steps(ranks: list[TokenWindows], accum: int, steps: int) -> list[list[int]]:
    """The window starts every optimizer step reads, over all ranks and micro-batches, in the order drawn."""
    out = []
    for _ in range(steps):
        out.append([int(s) for _ in range(accum) for src in ranks for s in src.next_batch()["input_ids"][:, 0]])
    return out


def _resume(saved: TokenWindows, ranks: list[TokenWindows]) -> list[TokenWindows]:
    return _resume_from(json.loads(json.dumps(saved.state_dict())), ranks)  # plain JSON, as in trainer.pt


def _resume_from(state: dict, ranks: list[TokenWindows]) -> list[TokenWindows]:
    for src in ranks:
        src.load_state_dict(state)
    return ranks


@pytest.mark.parametrize(("world", "batch", "accum"), [(1, 8, 1), (1, 2, 4), (2, 4, 1), (2, 2, 2), (4, 1, 2)])
def test_sequential_step_reads_the_same_windows_for_every_split(world, batch, accum):
    # Global batch 8 and 100 windows: step 13 wraps around (windows 96..99, then 0..3).
    got = _steps(_ranks(world, batch), accum, 14)
    want = [[((8 * s + g) % 100) * SEQ for g in range(8)] for s in range(14)]
    assert [sorted(step) for step in got] == [sorted(step) for step in want]


@pytest.mark.parametrize(("before", "after"), [((2, 2, 2), (1, 2, 4)), ((1, 2, 4), (2, 2, 2)), ((2, 4, 1), (4, 1, 2))])
def test_sequential_resume_on_another_world_size_neither_repeats_nor_skips(before, after, capsys):
    (w0, b0, a0), (w1, b1, a1) = before, after
    uninterrupted = _steps(_ranks(w0, b0), a0, 10)
    first = _ranks(w0, b0)
    got = _steps(first, a0, 4)
    capsys.readouterr()
    resumed = _resume(first[-1], _ranks(w1, b1))  # any rank's state: the position is the same on all of them
    got += _steps(resumed, a1, 6)
    assert [sorted(s) for s in got] == [sorted(s) for s in uninterrupted]
    flat = [s for step in got for s in step]
    assert len(flat) == len(set(flat)) == 80  # 80 of the 100 windows, none twice
    assert capsys.readouterr().err.splitlines() == [
        f"data: windows per call {w0} rank(s) x {b0} -> {w1} rank(s) x {b1}: sequential sampling continues the "
        "global order at window 32 (no window repeated or skipped)"
    ]


def test_sequential_resume_with_another_global_batch_continues_at_the_next_window():
    first = _ranks(2, 3)
    got = _steps(first, 1, 5)  # 30 windows
    got += _steps(_resume(first[0], _ranks(1, 4)), 1, 5)  # 20 more, in fours
    assert [s for step in got for s in sorted(step)] == [w * SEQ for w in range(50)]


def test_random_resume_is_exact_on_the_same_world_size_and_re_derived_on_another(capsys):
    tokens = np.random.default_rng(0).integers(0, 300, size=5000).astype(np.uint16)
    uninterrupted = _steps(_ranks(2, 2, "random", tokens), 2, 6)
    first = _ranks(2, 2, "random", tokens)
    got = _steps(first, 2, 3)
    got += _steps(_resume(first[1], _ranks(2, 2, "random", tokens)), 2, 3)
    assert got == uninterrupted  # rank by rank, row by row
    assert capsys.readouterr().err == ""  # nothing changed, nothing to say

    # 2 ranks x accumulation 2 -> 1 rank x accumulation 4 at step 3: the steps a run started on one rank reads there.
    one_rank = _steps(_ranks(1, 2, "random", tokens), 4, 6)
    moved = _steps(_resume(first[0], _ranks(1, 2, "random", tokens)), 4, 3)
    assert moved == one_rank[3:]
    assert moved != uninterrupted[3:]  # the rank streams are new: documented, not exact
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("data: windows per call 2 rank(s) x 2 -> 1 rank(s) x 2: random sampling keeps the global")


def test_only_rank_zero_reports_a_changed_split(capsys):
    saved = _ranks(1, 4)[0]
    _resume(saved, _ranks(2, 2))
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_a_position_of_other_settings_is_refused():
    saved = _ranks(1, 4)[0]
    for other in (
        TokenWindows(TOKENS, 4, SEQ + 2, mode="sequential", seed=5),
        TokenWindows(TOKENS, 4, SEQ, mode="sequential", seed=6),
        TokenWindows(TOKENS, 4, SEQ, mode="random", seed=5),
    ):
        with pytest.raises(ConfigError, match=r"^the checkpoint's data position is for data.sampling='sequential', "):
            other.load_state_dict(saved.state_dict())
    assert torch.equal(  # a refused load leaves the position alone
        other.next_batch()["input_ids"], TokenWindows(TOKENS, 4, SEQ, mode="random", seed=5).next_batch()["input_ids"]
    )


def test_a_per_rank_position_of_an_older_checkpoint_still_resumes():
    uninterrupted = _steps(_ranks(2, 3), 1, 4)
    old = {"mode": "sequential", "seed": 5, "step": 2}  # the format before the position was global
    assert _steps(_resume_from(old, _ranks(2, 3)), 1, 2) == uninterrupted[2:]
