"""Pretraining sources (every format, the hub), resumable preparation and its cache key, and bad inputs as one line
and exit code 2 from the pretrain entry point."""

import json
import os
import signal
import subprocess
import sys
import time

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from {{ cookiecutter.package }} import pretrain
from {{ cookiecutter.package }}.config import ConfigError
from {{ cookiecutter.package }}.data import sources, token_cache
from {{ cookiecutter.package }}.data.builtin import read_corpus_text
from {{ cookiecutter.package }}.data.corpus import prepare_corpus, sample_texts
from {{ cookiecutter.package }}.data.sources import resolve_source
from {{ cookiecutter.package }}.data.token_cache import prepare_tokens
from {{ cookiecutter.package }}.data.tokenizer import train_tokenizer

TEXT = read_corpus_text()[:60_000]
DOCS = [TEXT[i : i + 6000] for i in range(0, 60_000, 6000)]  # ten documents


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT], vocab_size=300)


def _table(docs=DOCS):
    return pa.table({"id": list(range(len(docs))), "text": docs})


def write_sources(root) -> dict:
    """The same ten documents as every kind of source; returns {kind: data.source}."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / "folder"
    (folder / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS):  # one document per file, spread over a subfolder (sorted walk order)
        (folder / ("sub" if i >= 5 else "") / f"{i:02d}.txt").write_text(doc)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(DOCS)))
    pq.write_table(_table(), root / "docs.parquet", row_group_size=3)
    with pa.ipc.new_file(root / "docs.arrow", _table().schema) as writer:  # Arrow IPC file ("ARROW1")
        writer.write_table(_table(), max_chunksize=4)
    with pa.ipc.new_stream(root / "stream.arrow", _table().schema) as writer:  # IPC stream (what datasets writes)
        writer.write_table(_table(), max_chunksize=4)
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(root / "saved")
    splits = {"train": DOCS, "validation": DOCS[:2]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        root / "saved_dict"
    )
    pq.write_table(_table(DOCS[:4]), root / "parts-0.parquet")
    pq.write_table(_table(DOCS[4:]), root / "parts-1.parquet")
    return {
        "folder": folder,
        "glob": root / "folder" / "**" / "*.txt",
        "jsonl": root / "docs.jsonl",
        "parquet": root / "docs.parquet",
        "parquet glob": root / "parts-*.parquet",
        "arrow file": root / "docs.arrow",
        "arrow stream": root / "stream.arrow",
        "saved dataset": root / "saved",
        "saved DatasetDict": root / "saved_dict",
    }


def test_every_source_type_reads_the_same_documents_and_tokens(tmp_path, tok):
    kinds = write_sources(tmp_path / "src")
    reference = prepare_tokens(resolve_source(kinds["jsonl"]), tok, tmp_path / "ref", chunk_tokens=512)
    for kind, spec in kinds.items():
        source = resolve_source(str(spec))
        assert list(source.documents()) == DOCS, kind
        cache = prepare_tokens(source, tok, tmp_path / "cache", chunk_tokens=512)
        assert np.array_equal(cache.train, reference.train) and np.array_equal(cache.val, reference.val), kind
        assert cache.meta["documents"] == 10
    assert [s.kind for s in map(resolve_source, (kinds["saved dataset"], kinds["folder"]))] == ["saved", "files"]
    assert list(resolve_source(kinds["saved DatasetDict"], split="validation").documents()) == DOCS[:2]
    # The progress bar's total: characters of text, also for compressed parquet (from its metadata).
    text_chars = sum(map(len, DOCS))
    for kind in ("folder", "parquet", "parquet glob"):
        assert 0.95 * text_chars < resolve_source(kinds[kind]).size_chars() < 1.1 * text_chars, kind
    with pytest.raises(ConfigError, match=r"saved_dict: no split 'test' \(data.split\); it has \['train', 'valid"):
        list(resolve_source(kinds["saved DatasetDict"], split="test").documents())


def test_files_are_read_by_their_format_or_refused_in_one_line(tmp_path):
    pq.write_table(_table(), tmp_path / "really_parquet.txt")  # the magic bytes win over the name
    assert list(resolve_source(tmp_path / "really_parquet.txt").documents()) == DOCS
    cases = {
        "nul.txt": (b"text\0with a NUL byte", r"nul.txt: binary, not UTF-8 text \(NUL byte at byte 4\)"),
        "latin1.txt": ("caf\xe9 cr\xe8me".encode("latin-1"), r"latin1.txt: binary, not UTF-8 text \(invalid"),
        "zipped.txt.gz": (b"\x1f\x8b\x08\x00rest", "zipped.txt.gz: a gzip archive; decompress it first"),
        "fake.parquet": (b"just some text", r"fake.parquet: named .parquet but not a parquet file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=message) as err:
            list(resolve_source(tmp_path / name).pieces())
        assert "\n" not in str(err.value)
    # Right magic bytes, damaged file: one line naming it.
    (tmp_path / "damaged.parquet").write_bytes((tmp_path / "really_parquet.txt").read_bytes()[:200])
    (tmp_path / "damaged.arrow").write_bytes(b"ARROW1\0\0 and then nothing")
    for name in ("damaged.parquet", "damaged.arrow"):
        with pytest.raises(ConfigError, match=rf"{name}: not a readable (parquet|arrow) file \(") as err:
            list(resolve_source(tmp_path / name).pieces())
        assert "\n" not in str(err.value)
    # UTF-8 cut mid-character at the end of the checked block is still text.
    (tmp_path / "long.txt").write_bytes(b"a" * (sources.SAMPLE_BYTES - 1) + "é more".encode())
    assert next(resolve_source(tmp_path / "long.txt").documents()).endswith("é more")


def test_missing_text_field_names_the_field_and_what_is_there(tmp_path):
    kinds = write_sources(tmp_path / "src")
    for kind in ("jsonl", "parquet", "arrow file", "arrow stream", "saved dataset"):
        with pytest.raises(ConfigError, match=r"no (string field|column) 'body' \(data.text_key\)") as err:
            list(resolve_source(kinds[kind], text_key="body").pieces())
        assert "text" in str(err.value) and "\n" not in str(err.value), kind


def test_a_large_text_file_streams_in_bounded_pieces(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_CHARS", 2000)
    (tmp_path / "big.txt").write_text(TEXT)
    pieces = list(resolve_source(tmp_path / "big.txt").pieces())
    assert len(pieces) > 25 and all(len(text) <= 2000 + 200 for text, _ in pieces)  # + at most one line
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(text for text, _ in pieces) == TEXT and all(t.endswith("\n") for t, _ in pieces[:-1])
    cache = prepare_tokens(resolve_source(tmp_path / "big.txt"), tok, tmp_path / "cache", val_fraction=0.0)
    stream = np.asarray(cache.train)
    assert (stream == tok.eos_token_id).sum() == 1 and cache.meta["documents"] == 1  # one document, EOS at its end
    assert tok.decode(stream[stream != tok.eos_token_id].tolist()) == TEXT  # byte-level: nothing lost at the cuts


# ----------------------------------------------------------------------------------------------------------------------
# Resumable preparation
# ----------------------------------------------------------------------------------------------------------------------
KILLED_RUN = """
import sys, time
from {{ cookiecutter.package }}.data import token_cache
from {{ cookiecutter.package }}.data.sources import resolve_source
from {{ cookiecutter.package }}.data.tokenizer import load_tokenizer

publish = token_cache.Staging.publish
def slow_publish(self, tmp, record):  # slow enough for the test to kill it between shards
    publish(self, tmp, record)
    time.sleep(0.3)
token_cache.Staging.publish = slow_publish
token_cache.BATCH_CHARS = 3000  # several batches, so several shards, in a small corpus
source, tokenizer, cache = sys.argv[1:4]
token_cache.prepare_tokens(resolve_source(source), load_tokenizer(tokenizer), cache, chunk_tokens=512, shard_chars=8000)
"""


def _entry_bytes(cache) -> tuple[bytes, bytes]:
    return (cache.path / "train.bin").read_bytes(), (cache.path / "val.bin").read_bytes()


def test_killed_preparation_resumes_with_identical_shards(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(token_cache, "BATCH_CHARS", 3000)
    kinds = write_sources(tmp_path / "src")
    tok.save_pretrained(str(tmp_path / "tok"))
    clean = prepare_tokens(resolve_source(kinds["folder"]), tok, tmp_path / "clean", chunk_tokens=512, shard_chars=8000)
    cache_dir = tmp_path / "killed"
    args = [sys.executable, "-c", KILLED_RUN, str(kinds["folder"]), str(tmp_path / "tok"), str(cache_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    manifests = list(cache_dir.glob("tokens-*.staging/manifest.json"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        manifests = list(cache_dir.glob("tokens-*.staging/manifest.json"))
        if manifests and len(json.loads(manifests[0].read_text())["shards"]) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()
    staged = json.loads(manifests[0].read_text())["shards"]
    assert 2 <= len(staged) < clean.meta["shards"]
    assert not [p for p in cache_dir.iterdir() if p.name.startswith("tokens-") and "staging" not in p.name]
    (manifests[0].parent / ".shard-99999.tmp").write_bytes(b"half a shard")  # what a kill mid-shard leaves
    encoded = []
    real = token_cache._encode_into
    resumed = None
    try:
        token_cache._encode_into = lambda batch, *a: (encoded.extend(batch), real(batch, *a))[1]
        resumed = prepare_tokens(resolve_source(kinds["folder"]), tok, cache_dir, chunk_tokens=512, shard_chars=8000)
    finally:
        token_cache._encode_into = real
    total = len(list(resolve_source(kinds["folder"]).pieces()))
    assert len(encoded) == total - sum(s["pieces"] for s in staged)  # only the pieces after the staged shards
    assert resumed.meta["shards"] == clean.meta["shards"] and _entry_bytes(resumed) == _entry_bytes(clean)
    assert not list(cache_dir.glob("*.staging"))


def test_failure_after_k_shards_publishes_nothing_then_resumes(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(token_cache, "BATCH_CHARS", 5000)  # a batch per document, a shard per two
    kinds = write_sources(tmp_path / "src")
    kwargs = {"chunk_tokens": 512, "shard_chars": 12_000}
    clean = prepare_tokens(resolve_source(kinds["jsonl"]), tok, tmp_path / "clean", **kwargs)
    real_publish = token_cache.Staging.publish

    def failing_publish(self, tmp, record):
        if len(self.shards) == 2:
            raise OSError("disk full")
        real_publish(self, tmp, record)

    monkeypatch.setattr(token_cache.Staging, "publish", failing_publish)
    with pytest.raises(OSError, match="disk full"):
        prepare_tokens(resolve_source(kinds["jsonl"]), tok, tmp_path / "cache", **kwargs)
    assert [p.name.endswith(".staging") for p in (tmp_path / "cache").glob("tokens-*")] == [True]
    monkeypatch.setattr(token_cache.Staging, "publish", real_publish)
    resumed = prepare_tokens(resolve_source(kinds["jsonl"]), tok, tmp_path / "cache", **kwargs)
    assert not resumed.cache_hit and _entry_bytes(resumed) == _entry_bytes(clean) and clean.meta["shards"] > 3


def test_cache_key_follows_data_tokenizer_and_split_only(tmp_path, tok, monkeypatch):
    f = tmp_path / "c.txt"
    big = (TEXT * 4)[: 3 * sources.SAMPLE_BYTES]
    f.write_text(big)
    first = prepare_tokens(resolve_source(f), tok, tmp_path / "cache", chunk_tokens=512)
    # Not in the key: the shard size, progress, a second resolve of the same path.
    again = prepare_tokens(resolve_source(str(f)), tok, tmp_path / "cache", chunk_tokens=512, shard_chars=10)
    assert again.cache_hit and again.path == first.path
    stat = f.stat()
    f.write_text(big[:-5] + "XXXXX")  # same size, restored mtime: the tail sample catches the edit
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert prepare_tokens(resolve_source(f), tok, tmp_path / "cache", chunk_tokens=512).path != first.path
    # The key never reads the whole file: an edit in the middle with size and mtime kept is not seen (the price of
    # a key that costs two 64 KiB reads per file; any real edit changes the mtime).
    middle = sources.SAMPLE_BYTES + 100
    f.write_text(big[:middle] + "Y" + big[middle + 1 : -5] + "XXXXX")
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited_key = resolve_source(f).fingerprint()
    f.write_text(big[:-5] + "XXXXX")
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert resolve_source(f).fingerprint() == edited_key
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: re-tokenized
    assert resolve_source(f).fingerprint() != edited_key
    assert prepare_tokens(resolve_source(f), tok, tmp_path / "cache", chunk_tokens=1024).path != first.path
    assert resolve_source(f, text_key="body").fingerprint() != resolve_source(f).fingerprint()


def test_tokenizer_trains_on_a_bounded_sample(tmp_path):
    source = resolve_source(write_sources(tmp_path / "src")["jsonl"])
    assert list(sample_texts(source, 13_000)) == DOCS[:3]  # whole pieces until the budget is spent
    kwargs = {"vocab_size": 300, "cache_dir": tmp_path / "cache", "log": None, "chunk_tokens": 512}
    small = prepare_corpus(source, train_sample_bytes=6000, **kwargs)
    full = prepare_corpus(source, train_sample_bytes=10**8, **kwargs)
    assert small.tokenizer_dir != full.tokenizer_dir and small.tokenizer.get_vocab() != full.tokenizer.get_vocab()
    assert train_tokenizer(DOCS[:1], 300).get_vocab() == small.tokenizer.get_vocab()
    assert prepare_corpus(source, train_sample_bytes=6000, **kwargs).tokenizer_cache_hit


# ----------------------------------------------------------------------------------------------------------------------
# The hub and the optional extra
# ----------------------------------------------------------------------------------------------------------------------
def test_hub_id_offline_says_what_to_download(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import time from HF_HUB_OFFLINE
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    source = resolve_source("some-org/some-corpus", subset="en", split="train")
    assert source.kind == "hub" and str(source) == "hub dataset some-org/some-corpus (en) [train]"
    with pytest.raises(ConfigError) as err:
        source.fingerprint()
    message = str(err.value)
    assert "\n" not in message and message.startswith("hub dataset some-org/some-corpus (en) [train]: cannot load")
    assert "hf download some-org/some-corpus --repo-type dataset --local-dir DIR" in message
    assert "save_to_disk(DIR)" in message and "--data.source DIR" in message


def test_sources_that_need_datasets_name_the_extra(tmp_path, monkeypatch):
    pq.write_table(_table(), tmp_path / "docs.parquet")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the [data] extra were not installed
    expected = r'reading docs.parquet needs the `datasets` package .*pip install -e ".\[data\]"'
    with pytest.raises(ConfigError, match=expected):
        list(resolve_source(tmp_path / "docs.parquet").pieces())
    (tmp_path / "a.jsonl").write_text('{"text": "plain JSONL needs nothing extra"}\n')
    assert list(resolve_source(tmp_path / "a.jsonl").documents()) == ["plain JSONL needs nothing extra"]


def test_source_resolution_errors(tmp_path):
    with pytest.raises(ConfigError, match="data source not found: .*nope.txt"):
        resolve_source(tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="data source not found: data/missing.parquet"):
        resolve_source("data/missing.parquet")  # shaped like a hub id, but a file name: not sent to the hub
    with pytest.raises(ConfigError, match=r"no file matches this pattern"):
        resolve_source(tmp_path / "*.parquet")
    assert resolve_source(None).kind == resolve_source("builtin").kind == "builtin"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing_field.jsonl", '{"body": "x"}\n', "missing_field.jsonl:1: no string field 'text' (data.text_key)"),
        ("empty.txt", "", "empty.txt: empty, no document has any non-whitespace text"),
        ("binary.txt", b"\x00\x01\x02 not text", "binary.txt: binary, not UTF-8 text"),
        ("offline", None, "hub dataset some-org/some-corpus [train]: cannot load it"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(tmp_path, pretrain_args, capsys, monkeypatch, name, content, message):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    source = str(path) if content is not None else "some-org/some-corpus"
    argv = [*pretrain_args, "--data.source", source, "--data.cache_dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0 and message in err, err
    assert not list((tmp_path / "cache").glob("tokens-*"))  # nothing a later run would read


def test_progress_lines_in_a_log_say_tokens_per_second_and_eta(capsys, monkeypatch):
    monkeypatch.setattr(token_cache.Progress, "LINE_SECONDS", 0.0)  # a line at every update
    progress = token_cache.Progress(total=4_000_000_000, done=1_000_000_000, enabled=True)  # resumed at 1 GB
    progress.start -= 10.0  # 10 s ago: 1 GB of the 3 GB left took 10 s
    progress.update(1_000_000_000, 250_000_000)
    progress.close()
    line = capsys.readouterr().err.strip()
    assert line == "tokenize: 2.00 GB of ~4.00 GB, 25.00M tok/s, ETA 00:20", line
    token_cache.Progress(total=None, done=0, enabled=False).update(10, 5)  # disabled: silent
    assert capsys.readouterr().err == ""
