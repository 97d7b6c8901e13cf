"""sha256 of files, folders and JSON-able values, the way the manifests record them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(folder: str | Path) -> str:
    """One digest for a folder: its files' relative paths and contents, in sorted order."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


def sha256_json(value) -> str:
    """Digest of a JSON-able value, independent of key order."""
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()
