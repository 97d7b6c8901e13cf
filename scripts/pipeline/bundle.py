"""Bundles: deterministic .tar.gz files with a SHA256SUMS, checked before anything in them is used.

`write` makes the same bytes from the same files every time: entries sorted, one fixed mtime, uid/gid 0
with empty user and group names, modes 0644 (0755 for executables and folders), GNU format (no PAX
headers with atime/ctime), and a gzip header with no file name and no timestamp. Every file but
SHA256SUMS is listed in SHA256SUMS (`sha256  path`, as `sha256sum -c` reads it).

`check` reads a bundle without extracting it and returns every problem: a member whose sha256 differs
from SHA256SUMS, one listed but missing, one present but unlisted, and any member `thaw` would refuse
(absolute paths, `..`, links leaving the bundle, devices and FIFOs, duplicates, members over the size
limit). `thaw` extracts only a bundle with no problem, through tarfile's "data" filter, into a fresh
folder inside DEST that is renamed into place last, so an interrupted or refused thaw leaves DEST as it
was.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from pipeline.errors import PipelineError

CHECKSUMS = "SHA256SUMS"
MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed, so the same files give the same bytes (SOURCE_DATE_EPOCH wins)
MAX_MEMBER_BYTES = 64 * 2**30  # a member claiming more is refused (a 135M model's float GGUF is ~0.5 GB)
_CHUNK = 1 << 20
KEPT_BYTES = 1 << 20  # members this small are kept in memory by `check` (SHA256SUMS, manifests, policies)


def reproducible_time() -> int:
    """The time written into files that must come out byte-identical: SOURCE_DATE_EPOCH (the
    reproducible-builds convention) if set, else MTIME."""
    given = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(given) if given.isdigit() else MTIME


@dataclasses.dataclass(frozen=True)
class Source:
    """One file of a bundle: its content from a path or from bytes; `executable` for scripts."""

    path: Path | None = None
    data: bytes | None = None
    executable: bool = False

    def open(self):
        return io.BytesIO(self.data) if self.data is not None else open(self.path, "rb")

    def size(self) -> int:
        return len(self.data) if self.data is not None else self.path.stat().st_size


def files_of(folder: Path, prefix: str) -> dict[str, Source]:
    """Every file under `folder` as bundle members under `prefix/` (executables keep their x bit)."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = f"{prefix}/{path.relative_to(folder).as_posix()}"
        found[name] = Source(path=path, executable=os.access(path, os.X_OK))
    return found


def write(out: Path, members: Mapping[str, Source]) -> str:
    """Write the bundle atomically; returns its sha256. Member names are relative POSIX paths."""
    for name in members:
        _check_name(name, where=str(out))
    sums = {name: _sha256(source.open) for name, source in members.items()}
    listing = "".join(f"{sums[name]}  {name}\n" for name in sorted(members)).encode()
    everything = {**members, CHECKSUMS: Source(data=listing)}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as zipped:
                with tarfile.open(fileobj=zipped, mode="w", format=tarfile.GNU_FORMAT) as tar:
                    for directory in _directories(everything):
                        tar.addfile(_info(directory, tarfile.DIRTYPE, 0, 0o755))
                    for name in sorted(everything):
                        source = everything[name]
                        mode = 0o755 if source.executable else 0o644
                        with source.open() as handle:
                            tar.addfile(_info(name, tarfile.REGTYPE, source.size(), mode), handle)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(temp, 0o644)  # mkstemp makes it private; a bundle is made to be handed over
        os.replace(temp, out)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return _sha256(lambda: open(out, "rb"))


def _directories(members) -> list[str]:
    found = set()
    for name in members:
        parts = PurePosixPath(name).parts
        found.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
    return sorted(found)


def _info(name: str, kind: bytes, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, size, mode, reproducible_time()
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _sha256(opener) -> str:
    digest = hashlib.sha256()
    with opener() as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- reading --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Contents:
    """What `check` found: each regular file's sha256 and size, and every problem, one line each."""

    files: dict[str, tuple[str, int]]
    problems: list[str]
    small: dict[str, bytes] = dataclasses.field(default_factory=dict)  # members up to KEPT_BYTES, read once

    def data(self, name: str) -> bytes | None:
        """A small member's content (manifests, policies, lists), without reading the bundle again."""
        return self.small.get(name)


def check(bundle: Path, max_member_bytes: int = MAX_MEMBER_BYTES) -> Contents:
    """Read the whole bundle once, extracting nothing. A bundle that is not a readable .tar.gz (truncated,
    corrupted) raises one PipelineError naming it."""
    files: dict[str, tuple[str, int]] = {}
    small: dict[str, bytes] = {}
    problems: list[str] = []
    seen: set[str] = set()
    try:
        with tarfile.open(bundle, mode="r:gz") as tar:
            for member in tar:
                name = _normal(member.name.rstrip("/"))  # `tar czf x .` writes ./name
                if name in ("", ".") and member.isdir():
                    continue
                problem = _member_problem(member, name, seen, max_member_bytes)
                seen.add(name)
                if problem:
                    problems.append(f"{name}: {problem}")
                    continue
                if member.isfile():
                    handle = tar.extractfile(member)
                    if member.size <= KEPT_BYTES:
                        small[name] = handle.read()
                        digest = hashlib.sha256(small[name])
                    else:
                        digest = hashlib.sha256()
                        while chunk := handle.read(_CHUNK):
                            digest.update(chunk)
                    files[name] = (digest.hexdigest(), member.size)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError, ValueError) as exc:
        raise PipelineError(
            f"not a readable bundle ({type(exc).__name__}: {exc})",
            where=str(bundle),
            fix="the file is truncated or damaged: copy it again from where it was made",
        ) from None
    problems += _checksum_problems(files, small.get(CHECKSUMS))
    return Contents(files, problems, small)


def _member_problem(member: tarfile.TarInfo, name: str, seen: set[str], max_bytes: int) -> str | None:
    path = PurePosixPath(name)
    if name.startswith("/") or (path.parts and path.parts[0].endswith(":")):
        return "an absolute path"
    if ".." in path.parts:
        return "a path with '..' (it would land outside the destination)"
    if _normal(name) in seen:
        return "a duplicate member (a second copy would overwrite the first)"
    if member.ischr() or member.isblk() or member.isfifo():
        return "a device file or FIFO"
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        base = path.parent if member.issym() else PurePosixPath()
        if member.linkname.startswith("/") or _escapes(base / target):
            return f"a link to '{member.linkname}', outside the bundle"
        return None
    if not (member.isfile() or member.isdir()):
        return "not a file or folder"
    if member.size > max_bytes:
        return f"{member.size:,} bytes, over the {max_bytes:,}-byte limit for one member"
    return None


def _escapes(path: PurePosixPath) -> bool:
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else 0 if part in (".", "") else 1
        if depth < 0:
            return True
    return False


def _normal(name: str) -> str:
    """./a//b -> a/b (how `tar czf x .` and others write names); '..' and a leading '/' are kept."""
    return PurePosixPath(name).as_posix()


def _checksum_problems(files: dict, listing: bytes | None) -> list[str]:
    if listing is None:
        return [f"{CHECKSUMS}: missing (nothing in the bundle can be checked)"]
    listed = {}
    for number, line in enumerate(listing.decode("utf-8", "replace").splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            return [f"{CHECKSUMS}:{number}: not a 'sha256  path' line"]
        listed[name] = digest
    problems = []
    for name, digest in sorted(listed.items()):
        if name not in files:
            problems.append(f"{name}: listed in {CHECKSUMS} but not in the bundle")
        elif files[name][0] != digest:
            problems.append(f"{name}: sha256 {files[name][0]}, {CHECKSUMS} says {digest}")
    problems += [
        f"{name}: in the bundle but not listed in {CHECKSUMS}"
        for name in sorted(set(files) - set(listed) - {CHECKSUMS})
    ]
    return problems


def thaw(bundle: Path, dest: Path, max_member_bytes: int = MAX_MEMBER_BYTES) -> Path:
    """Check the bundle, then extract it into DEST (created if missing; existing contents are kept, and a
    member that would overwrite one is an error). Returns DEST."""
    contents = check(bundle, max_member_bytes)
    if contents.problems:
        raise PipelineError(
            f"refused: {contents.problems[0]}"
            + (f" (and {len(contents.problems) - 1} more problems)" if len(contents.problems) > 1 else ""),
            where=str(bundle),
            fix="nothing was extracted; `make verify BUNDLE=...` lists every problem",
        )
    dest.mkdir(parents=True, exist_ok=True)
    clashes = sorted(name for name in contents.files if (dest / name).exists())
    if clashes:
        raise PipelineError(
            f"'{clashes[0]}' is already in the destination", where=str(dest), fix="thaw into an empty folder"
        )
    staging = Path(tempfile.mkdtemp(prefix=".thawing-", dir=dest))
    try:
        with tarfile.open(bundle, mode="r:gz") as tar:
            tar.extractall(staging, filter="data")
        for child in sorted(staging.iterdir()):
            os.replace(child, dest / child.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _check_name(name: str, where: str) -> None:
    path = PurePosixPath(name)
    if not name or name.startswith("/") or ".." in path.parts or name == CHECKSUMS:
        raise PipelineError(f"bad bundle member name '{name}'", where=where)
