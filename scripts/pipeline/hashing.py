"""sha256 of files, folders and JSON-able values, the way the manifests record them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import orjson

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(folder: str | Path, file_digest: Callable[[Path], str] = sha256_file) -> str:
    """One digest for a folder: its files' relative paths and contents, in sorted order."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(file_digest(path).encode() + b"\n")
    return digest.hexdigest()


def sha256_json(value) -> str:
    """Digest of a JSON-able value, independent of key order."""
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


class Sha256Cache:
    """File digests remembered by (device, inode, size, mtime): a rename keeps them, any write changes them.
    Saved in .state/ so the checks Make runs before every target need not re-read gigabytes of weights."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._entries = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            self._entries = {}
        self._dirty = False

    def file(self, path: str | Path) -> str:
        st = Path(path).stat()
        key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        if key not in self._entries:
            self._entries[key] = sha256_file(path)
            self._dirty = True
        return self._entries[key]

    def tree(self, folder: str | Path) -> str:
        return sha256_tree(folder, self.file)

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(self._entries))
        os.replace(tmp, self.path)
        self._dirty = False
