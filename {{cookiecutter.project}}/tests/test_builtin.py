"""The shipped corpus and datasets: clean, balanced, and exactly what the builders produce."""

import collections

import pytest

from {{ cookiecutter.package }}.data import builtin
from {{ cookiecutter.package }}.data.builtin import (
    BUILTIN_CLASSIFY,
    BUILTIN_CORPUS,
    BUILTIN_SFT,
    GENRES,
    PLAYS,
    build_classify_records,
    build_sft_records,
    check_corpus_text,
    jsonl_text,
    read_corpus_text,
    read_jsonl_records,
    split_plays,
    strip_gutenberg,
)


@pytest.fixture(scope="module")
def corpus_text():
    return read_corpus_text()


def test_files_ship_with_the_package():
    for path in (BUILTIN_CORPUS, BUILTIN_SFT, BUILTIN_CLASSIFY, BUILTIN_CORPUS.with_name("README.md")):
        assert path.is_file(), path
    assert 900_000 < BUILTIN_CORPUS.stat().st_size < 1_300_000


def test_corpus_is_clean_plays(corpus_text):
    check_corpus_text(corpus_text)  # raises on licence boilerplate or template syntax
    assert "gutenberg" not in corpus_text.lower()
    plays = split_plays(corpus_text)
    assert [p.info for p in plays] == list(PLAYS)
    assert collections.Counter(p.info.genre for p in plays) == {g: 3 for g in GENRES}
    assert "Is this a dagger which I see before me" in plays[3].text  # Macbeth
    assert "If music be the food of love, play on" in plays[0].text  # Twelfth Night


def test_strip_gutenberg_removes_header_footer_and_licence_lines():
    raw = (
        "The Project Gutenberg EBook of Macbeth\r\nblah\r\n*** START OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\r\n"
        "MACBETH\r\n\r\n\r\n\r\n\r\nFair is foul.   \r\nThis etext is a Project Gutenberg product.\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\r\nlicence text\r\n"
    )
    assert strip_gutenberg(raw) == "MACBETH\n\n\nFair is foul.\n"
    with pytest.raises(ValueError, match="boilerplate"):
        check_corpus_text("Fair is foul.\nProject Gutenberg-tm trademark\n")


def test_shipped_datasets_equal_the_builders_output(corpus_text):
    assert BUILTIN_SFT.read_text(encoding="utf-8") == jsonl_text(build_sft_records(corpus_text))
    assert BUILTIN_CLASSIFY.read_text(encoding="utf-8") == jsonl_text(build_classify_records(corpus_text))
    # A different seed gives a different (but equally shaped) dataset.
    other = build_classify_records(corpus_text, seed=7)
    assert len(other) == 2100 and other != read_jsonl_records(BUILTIN_CLASSIFY)


def test_sft_records():
    records = read_jsonl_records(BUILTIN_SFT)
    plain = [r for r in records if "prompt" in r]
    chats = [r for r in records if "messages" in r]
    assert len(plain) == 400 and len(chats) == 20
    assert all(set(r) == {"prompt", "response"} and r["prompt"] and r["response"] for r in plain)
    titles = {p.title for p in PLAYS}
    which = [r for r in plain if r["prompt"].startswith("Which play")]
    assert len(which) == 120 and {r["response"] for r in which} <= titles
    assert len({r["response"] for r in which}) == len(PLAYS)  # every play is asked about
    for chat in chats:
        roles = [m["role"] for m in chat["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in chat["messages"])
    # The passage really comes from the play named in the answer.
    plays = {p.info.title: p.text for p in split_plays(read_corpus_text())}
    for r in which[:20]:
        first_line = r["prompt"].split("\n\n", 1)[1].split("\n")[0]
        assert first_line in plays[r["response"]]


def test_classify_records_balanced_with_fixed_split():
    records = read_jsonl_records(BUILTIN_CLASSIFY)
    assert len(records) == 2100
    assert all(set(r) == {"text", "label", "play", "split"} for r in records)
    counts = collections.Counter((r["label"], r["split"]) for r in records)
    for genre in GENRES:
        assert counts[(genre, "train")] == 595 and counts[(genre, "val")] == 105
    genre_of = {p.title: p.genre for p in PLAYS}
    assert all(genre_of[r["play"]] == r["label"] for r in records)
    assert all(150 <= len(r["text"]) <= 400 for r in records)
    texts = [r["text"] for r in records]
    assert len(set(texts)) == len(texts)  # no duplicates, so no train/val leakage
    # Speaker headings and stage directions are not part of the passages.
    assert not any(t.startswith(("MACBETH.", "KING HENRY.")) or "[Exit" in t for t in texts)


def test_builder_module_has_a_command_line(tmp_path, capsys):
    (tmp_path / BUILTIN_CORPUS.name).write_text(read_corpus_text(), encoding="utf-8")
    builtin.main(["--out-dir", str(tmp_path)])
    assert (tmp_path / "sft.jsonl").read_bytes() == BUILTIN_SFT.read_bytes()
    assert (tmp_path / "classify.jsonl").read_bytes() == BUILTIN_CLASSIFY.read_bytes()
    assert "Henry V" in capsys.readouterr().out
