"""sha256 of files, folders and JSON-able values, the way the manifests record them."""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable, Iterable
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
    return _tree_digest((path.relative_to(folder).as_posix(), file_digest(path)) for path in _files_in(folder))


def tree_digest_of(files: dict[str, str]) -> str:
    """sha256_tree of a folder given as {relative posix path: file sha256} (a folder inside a bundle)."""
    return _tree_digest((name, files[name]) for name in sorted(files, key=lambda name: Path(name).parts))


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _tree_digest(named_digests: Iterable[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for name, file_digest in named_digests:
        digest.update(name.encode() + b"\0")
        digest.update(file_digest.encode() + b"\n")
    return digest.hexdigest()


def _sized_sha256(path: Path) -> tuple[int, str]:
    return path.stat().st_size, sha256_file(path)


def fingerprint(
    path: str | Path, sized_digest: Callable[[Path], tuple[int, str]] = _sized_sha256, shown: str | None = None
) -> dict:
    """A data source file by file, as prepare records it and Make re-checks it: {"sha256", "bytes", "files"}.

    "files" lists {"path", "bytes", "sha256"} of the file, or of every file in the folder, sorted; a file's
    "path" is `shown` (how the source's own path is written, default as given), a folder's files are
    `shown`/<path inside>. "sha256" is sha256_file's for a file and sha256_tree's for a folder, so either
    compares equal with what those recorded. `sized_digest` gives (bytes, sha256): Sha256Cache.sized reads
    a file only when its size or mtime changed."""
    path = Path(path)
    shown = str(path) if shown is None else shown
    if not path.is_dir():
        size, digest = sized_digest(path)
        return {"sha256": digest, "bytes": size, "files": [{"path": shown, "bytes": size, "sha256": digest}]}
    files, named = [], []
    for file in _files_in(path):
        name = file.relative_to(path).as_posix()
        size, digest = sized_digest(file)
        files.append({"path": f"{shown}/{name}", "bytes": size, "sha256": digest})
        named.append((name, digest))
    return {"sha256": _tree_digest(named), "bytes": sum(f["bytes"] for f in files), "files": files}


def changed_files(recorded: Iterable[dict], current: Iterable[dict]) -> list[str]:
    """What differs between two "files" lists of fingerprint(), by path: "<path> is changed", "<path> was
    added", "<path> was removed"."""
    before = {f["path"]: f["sha256"] for f in recorded}
    after = {f["path"]: f["sha256"] for f in current}
    found = []
    for name in sorted(before.keys() | after.keys()):
        if name not in before:
            found.append(f"{name} was added")
        elif name not in after:
            found.append(f"{name} was removed")
        elif before[name] != after[name]:
            found.append(f"{name} is changed")
    return found


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
        return self.sized(path)[1]

    def sized(self, path: str | Path) -> tuple[int, str]:
        """(bytes, sha256) of a file from one stat; the content is read only for a key not seen before."""
        st = Path(path).stat()
        key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        if key not in self._entries:
            self._entries[key] = sha256_file(path)
            self._dirty = True
        return st.st_size, self._entries[key]

    def tree(self, folder: str | Path) -> str:
        return sha256_tree(folder, self.file)

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Stages running side by side (make -j) each add what they hashed to what the file holds now.
        with open(self.path.with_name(f".{self.path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries = {**orjson.loads(self.path.read_bytes()), **self._entries}
            except (OSError, orjson.JSONDecodeError):
                entries = self._entries
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(orjson.dumps(entries))
            os.replace(tmp, self.path)
        self._dirty = False
