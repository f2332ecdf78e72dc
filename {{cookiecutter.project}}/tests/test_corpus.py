"""Sources (files -> documents), the token cache (packing, content-hash key) and the TokenWindows / EvalWindows
batch sources."""

import json

import numpy as np
import pytest
import torch

from {{ cookiecutter.package }}.data import token_cache
from {{ cookiecutter.package }}.data.builtin import read_corpus_text
from {{ cookiecutter.package }}.data.corpus import EvalWindows, TokenWindows, prepare_corpus
from {{ cookiecutter.package }}.data.sources import jsonl_texts, resolve_source
from {{ cookiecutter.package }}.data.token_cache import prepare_tokens, token_dtype
from {{ cookiecutter.package }}.data.tokenizer import train_tokenizer

TEXT = read_corpus_text()[:40_000]


def tokenize_corpus(path, tokenizer, cache_dir, **kwargs):
    return prepare_tokens(resolve_source(path), tokenizer, cache_dir, **kwargs)


def iter_documents(path, **kwargs):
    return resolve_source(path, **kwargs).documents()


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT], vocab_size=300)


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(TEXT[:15_000])
    (d / "sub" / "b.md").write_text(TEXT[15_000:30_000])
    (d / "skip.bin").write_text("not text")
    (d / ".hidden").mkdir()
    (d / ".hidden" / "c.txt").write_text("hidden")
    return d


def test_readers(tmp_path, text_dir):
    assert list(iter_documents(text_dir, suffixes=(".txt", ".md"))) == [TEXT[:15_000], TEXT[15_000:30_000]]
    assert list(iter_documents(text_dir, suffixes=(".txt",))) == [TEXT[:15_000]]
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"body": "two", "text": "three"}) + "\n")
    assert list(jsonl_texts(p)) == ["one", "three"]
    docs = list(iter_documents(None))
    assert len(docs) == 9 and docs[3].startswith("MACBETH")


def test_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="data source not found"):
        list(iter_documents(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no files with suffixes"):
        list(iter_documents(tmp_path))
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no string field 'text' \(data.text_key\)"):
        list(jsonl_texts(p))
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: invalid JSON"):
        list(jsonl_texts(p))


def test_token_dtype():
    assert token_dtype(300) == np.uint16
    assert token_dtype(65_536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65_537) == np.uint32
    assert token_dtype(128_256) == np.uint32


def test_packing_eos_between_documents_and_split(tmp_path, tok):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text(TEXT[i * 5000 : (i + 1) * 5000])
    cache = tokenize_corpus(docs, tok, tmp_path / "cache", val_fraction=0.2, chunk_tokens=512)
    train, val, meta = cache.train, cache.val, cache.meta
    assert train.dtype == np.uint16 and meta["dtype"] == "uint16" and meta["documents"] == 3
    stream = np.concatenate([train, val])
    assert (stream == tok.eos_token_id).sum() == 3  # one EOS after each document
    expected = sum(len(tok(TEXT[i * 5000 : (i + 1) * 5000])["input_ids"]) + 1 for i in range(3))
    assert len(train) + len(val) == expected
    assert 0.1 < len(val) / expected < 0.3
    assert int(stream.max()) < len(tok)


def test_tiny_corpus_still_gets_validation(tmp_path, tok):
    f = tmp_path / "tiny.txt"
    f.write_text(TEXT[:800])
    cache = tokenize_corpus(f, tok, tmp_path / "cache", val_fraction=0.1, chunk_tokens=4096)
    total = len(cache.train) + len(cache.val)
    assert len(cache.val) == round(total * 0.1) and len(cache.train) > 0


def test_cache_reuse_and_invalidation(tmp_path, tok, monkeypatch):
    calls = []
    real_encode = token_cache.encode_shards

    def counting_encode(*args, **kwargs):
        calls.append(1)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(token_cache, "encode_shards", counting_encode)
    f = tmp_path / "c.txt"
    f.write_text(TEXT[:10_000])
    first = tokenize_corpus(f, tok, tmp_path / "cache", chunk_tokens=512)
    mtime = (first.path / "train.bin").stat().st_mtime_ns
    second = tokenize_corpus(f, tok, tmp_path / "cache", chunk_tokens=512)
    assert calls == [1] and not first.cache_hit and second.cache_hit
    assert second.path == first.path and (second.path / "train.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(first.train, second.train)
    # Content, split settings and tokenizer are all part of the key.
    f.write_text(TEXT[:10_000] + " and one more line")
    third = tokenize_corpus(f, tok, tmp_path / "cache", chunk_tokens=512)
    assert len(calls) == 2 and third.path != first.path
    tokenize_corpus(f, tok, tmp_path / "cache", chunk_tokens=512, val_fraction=0.3)
    other_tok = train_tokenizer([TEXT[:5000]], vocab_size=280)
    tokenize_corpus(f, other_tok, tmp_path / "cache", chunk_tokens=512)
    assert len(calls) == 4
    # No temporary or staging directories are left behind.
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".") or "staging" in p.name]
    assert not leftovers


def test_empty_corpus_error(tmp_path, tok):
    f = tmp_path / "empty.txt"
    f.write_text("  \n\n ")
    with pytest.raises(ValueError, match="empty.txt: empty, no document has any non-whitespace text"):
        tokenize_corpus(f, tok, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["locks"]  # nothing was published or staged


def test_prepare_corpus_trains_and_caches_tokenizer(tmp_path, text_dir):
    kwargs = dict(vocab_size=300, cache_dir=tmp_path / "cache", chunk_tokens=1024, log=None)
    first = prepare_corpus(text_dir, **kwargs)
    assert not first.cache_hit and not first.tokenizer_cache_hit
    assert first.vocab_size == 300 and (first.tokenizer_dir / "tokenizer.json").is_file()
    second = prepare_corpus(text_dir, **kwargs)
    assert second.cache_hit and second.tokenizer_cache_hit and second.tokenizer_dir == first.tokenizer_dir
    assert np.array_equal(first.val, second.val) and len(first.val) > 0
    # An explicit tokenizer is used as is.
    third = prepare_corpus(text_dir, tokenizer=first.tokenizer_dir, **kwargs)
    assert third.cache_hit and third.tokenizer.get_vocab() == first.tokenizer.get_vocab()


def test_prepare_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="data source not found: .*missing"):
        prepare_corpus(tmp_path / "missing", cache_dir=tmp_path, log=None)


def _tokens(n=5000, vocab=300):
    return np.random.default_rng(0).integers(0, vocab, size=n).astype(np.uint16)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_windows_shapes_determinism_and_exact_resume(mode):
    tokens = _tokens()
    src = TokenWindows(tokens, batch_size=4, seq_len=16, mode=mode, seed=3)
    batch = src.next_batch()
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"], batch["labels"])
    # Every row is a real slice of the array.
    row = batch["input_ids"][1].numpy()
    hits = [s for s in range(len(tokens) - 15) if np.array_equal(tokens[s : s + 16], row)]
    assert hits

    uninterrupted = TokenWindows(tokens, 4, 16, mode=mode, seed=3)
    expected = [uninterrupted.next_batch()["input_ids"] for _ in range(6)]
    first = TokenWindows(tokens, 4, 16, mode=mode, seed=3)
    got = [first.next_batch()["input_ids"] for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # the state is plain JSON
    resumed = TokenWindows(tokens, 4, 16, mode=mode, seed=3)
    resumed.load_state_dict(state)
    got += [resumed.next_batch()["input_ids"] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert not torch.equal(expected[0], expected[1])


def test_random_mode_depends_on_seed_and_rank():
    tokens = _tokens()
    a = TokenWindows(tokens, 4, 16, seed=1).next_batch()["input_ids"]
    b = TokenWindows(tokens, 4, 16, seed=2).next_batch()["input_ids"]
    c = TokenWindows(tokens, 4, 16, seed=1, rank=1, world_size=2).next_batch()["input_ids"]
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_sequential_walks_in_order_and_ddp_ranks_are_disjoint():
    tokens = np.arange(1000, dtype=np.uint16)
    single = TokenWindows(tokens, batch_size=2, seq_len=10, mode="sequential")
    assert single.next_batch()["input_ids"][:, 0].tolist() == [0, 10]
    assert single.next_batch()["input_ids"][:, 0].tolist() == [20, 30]
    ranks = [TokenWindows(tokens, 2, 10, mode="sequential", rank=r, world_size=3) for r in range(3)]
    seen = [int(s) for _ in range(16) for src in ranks for s in src.next_batch()["input_ids"][:, 0]]
    assert len(seen) == 96 and len(set(seen)) == 96  # 96 of the 100 windows, none twice
    # Resuming a rank from rank 0's saved state continues that rank's own stream.
    state = ranks[0].state_dict()
    fresh = TokenWindows(tokens, 2, 10, mode="sequential", rank=2, world_size=3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.next_batch()["input_ids"], ranks[2].next_batch()["input_ids"])


def test_window_errors():
    with pytest.raises(ValueError, match="fewer than one window of seq_len=64"):
        TokenWindows(np.arange(50, dtype=np.uint16), 2, 64)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TokenWindows(np.arange(50, dtype=np.uint16), 4, 10, mode="sequential", world_size=2)
    src = TokenWindows(np.arange(500, dtype=np.uint16), 2, 10, mode="random")
    with pytest.raises(ValueError, match="data.sampling='sequential'"):
        src.load_state_dict({**src.state_dict(), "mode": "sequential"})
    with pytest.raises(ValueError, match="mode must be"):
        TokenWindows(np.arange(500, dtype=np.uint16), 2, 10, mode="shuffled")


def test_eval_windows_fixed_and_sharded():
    tokens = np.arange(2000, dtype=np.uint16)
    ev = EvalWindows(tokens, batch_size=2, seq_len=10, num_batches=3)
    first = [b["input_ids"] for b in ev]
    again = [b["input_ids"] for b in ev]
    assert len(ev) == 3 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    starts = [int(s) for b in first for s in b[:, 0]]
    assert starts[0] == 0 and starts[-1] == 1990 and starts == sorted(starts)
    shards = [EvalWindows(tokens, 2, 10, 3, rank=r, world_size=2) for r in range(2)]
    rank_starts = [{int(s) for b in sh for s in b["input_ids"][:, 0]} for sh in shards]
    assert len(rank_starts[0]) == len(rank_starts[1]) == 6 and not rank_starts[0] & rank_starts[1]
    assert len(EvalWindows(tokens, 4, 10)) == 2000 // 10 // 4  # default: one pass of non-overlapping windows
    with pytest.raises(ValueError, match="the validation split has 5 tokens"):
        EvalWindows(tokens[:5], 2, 10)
