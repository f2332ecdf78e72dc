"""A directory that verifies itself: ``manifest.json`` lists every other file under it with its size and sha256
(format 1: ``"files"`` maps each relative path, ``"model.safetensors"`` say, to ``{"size": 5678, "sha256": "..."}``).
Checkpoints (:mod:`.checkpoint`) write it last, just before they are published, and compare against it before they
are read."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    """Make a file's bytes, or a rename inside a directory, durable. Directories cannot be opened on Windows."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> None:
    """Write the manifest of every file under ``directory``: its relative path, size and sha256."""
    payload = sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / MANIFEST_FILE)
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in payload}
    text = json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1)
    (directory / MANIFEST_FILE).write_text(text + "\n", encoding="utf-8")


def _read_manifest(directory: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"} }``; raises ValueError saying what is wrong with the manifest."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{MANIFEST_FILE} is unreadable ({' '.join(str(err).split())})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{MANIFEST_FILE} has format {found!r}, this version reads {MANIFEST_FORMAT}")
    files = manifest.get("files")
    entries = files.values() if isinstance(files, dict) else [None]
    if not all(isinstance(v, dict) and {"size", "sha256"} <= v.keys() for v in entries):
        raise ValueError(f"{MANIFEST_FILE} has no valid file list")
    return files


def find_damage(directory: Path, *, hashes: bool = True, log: Callable[[str], None] | None = None) -> str | None:
    """What is wrong with ``directory`` against its manifest, or None. All sizes are compared before any hash, so
    a truncated file is named without reading gigabytes; ``hashes=False`` stops there. Without a manifest (saved by
    an older version) there is nothing to compare: None, and ``log`` gets a notice."""
    if not (directory / MANIFEST_FILE).exists():
        if log is not None:
            log(f"notice: {directory} has no {MANIFEST_FILE} (saved by an older version): using it unverified")
        return None
    try:
        files = _read_manifest(directory)
    except ValueError as err:
        return str(err)
    for name, want in files.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if (size := file.stat().st_size) != want["size"]:
            return f"{name} is {size} bytes, manifest says {want['size']}"
    for name, want in files.items() if hashes else ():
        if (digest := _sha256(directory / name)) != want["sha256"]:
            return f"{name} has sha256 {digest[:12]}..., manifest says {want['sha256'][:12]}...: its bytes changed"
    return None
