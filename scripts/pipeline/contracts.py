"""Contract files: JSON validated against config/schemas/<name>.schema.json, written atomically.

Writers validate before touching the disk, then write a temp file in the same folder, fsync it
and rename it over the target, so a reader never sees a half-written file. Readers validate and
report every violation at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline import paths
from pipeline.errors import ContractError

import orjson
from jsonschema import Draft202012Validator, FormatChecker

_JSON_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY


@functools.cache
def validator(schema_name: str) -> Draft202012Validator:
    path = paths.SCHEMA_DIR / f"{schema_name}.schema.json"
    try:
        schema = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise ContractError(f"no schema named {schema_name}", where=paths.display(path)) from None
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FormatChecker())


def schema_version(schema_name: str) -> int:
    return validator(schema_name).schema["properties"]["schema_version"]["const"]


def violations(obj, schema_name: str) -> list[str]:
    """Every violation of the schema, as `$.path: message` lines, sorted by path."""
    errors = sorted(validator(schema_name).iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{_json_path(e.absolute_path)}: {e.message}" for e in errors]


def validate(obj, schema_name: str, where: str) -> None:
    found = violations(obj, schema_name)
    if found:
        raise ContractError(
            f"{len(found)} violation(s) of schema {schema_name}: " + "; ".join(found),
            where=where,
            fix="the file was changed by hand or by another version of the pipeline: re-run the stage that writes it",
        )


def write_json(path: str | Path, obj, schema_name: str) -> Path:
    """Validate `obj` (its schema_version filled in), then write it atomically."""
    path = Path(path)
    obj = {"schema_version": schema_version(schema_name), **obj}
    validate(obj, schema_name, where=f"writing {paths.display(path)}")
    write_bytes_atomic(path, orjson.dumps(obj, option=_JSON_OPTIONS) + b"\n")
    return path


def read_json(path: str | Path, schema_name: str) -> dict:
    path = Path(path)
    where = paths.display(path)
    try:
        obj = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise ContractError(
            "file not found", where=where, fix="run the stage that makes it (see `make help`)"
        ) from None
    except orjson.JSONDecodeError as exc:
        raise ContractError(f"not valid JSON: {exc}", where=where, fix="re-run the stage that writes it") from exc
    validate(obj, schema_name, where=where)
    return obj


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_if_changed(path: str | Path, text: str) -> bool:
    """Write only when the content differs, so the file's mtime says when its content changed."""
    path = Path(path)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    write_bytes_atomic(path, text.encode("utf-8"))
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it into place, else remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any other file
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; on success it replaces `path` whole, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any other folder
    old = path.parent / f".{path.name}.old"
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _json_path(parts) -> str:
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out
