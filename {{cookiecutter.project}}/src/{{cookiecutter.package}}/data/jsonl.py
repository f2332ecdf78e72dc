"""JSON Lines, read one way by every data module: the pre-training corpus, SFT, classification, the shipped sets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import ConfigError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line, streamed (a pre-training corpus can be large).

    A missing file or a malformed line is a one-line :class:`ConfigError` naming ``path:line``. Undecodable bytes
    become U+FFFD instead of stopping a large corpus at one bad character.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            yield lineno, value
