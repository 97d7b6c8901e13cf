"""Contracts: every schema is valid, writers validate and write atomically, readers report every violation."""

from __future__ import annotations

import json
import os

from pipeline import contracts
from pipeline.errors import ContractError

import pytest

from helpers import REPO

# Contract files' schemas; config.schema.json describes the config itself (tests/test_config.py).
SCHEMAS = sorted(
    p.name.removesuffix(".schema.json")
    for p in (REPO / "config" / "schemas").glob("*.schema.json")
    if p.name != "config.schema.json"
)

GOOD_MANIFEST = {
    "stage": "model",
    "experiment": None,
    "config": {"model": {"dtype": "auto"}},
    "inputs": [],
    "outputs": [{"role": "model", "path": ".cache/models/x", "sha256": "a" * 64, "bytes": 1, "kind": "folder"}],
    "environment": {
        "platform": "Linux-x86_64",
        "device": "cpu",
        "accelerator": "none",
        "blas": "openblas",
        "versions": {"mlx": "0"},
    },
    "started_at": "2026-11-22T04:00:00+00:00",
    "wall_seconds": 1.5,
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_is_valid_and_versioned(name):
    validator = contracts.validator(name)
    assert isinstance(contracts.schema_version(name), int)
    assert "schema_version" in validator.schema["required"]


def test_write_then_read_round_trip(tmp_path):
    path = contracts.write_json(tmp_path / "m.json", GOOD_MANIFEST, "run_manifest")
    back = contracts.read_json(path, "run_manifest")
    assert back["schema_version"] == 1 and back["outputs"] == GOOD_MANIFEST["outputs"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp file left


def test_invalid_object_is_not_written_and_every_violation_is_named(tmp_path):
    broken = {**GOOD_MANIFEST, "wall_seconds": -1, "stage": "Bad Stage", "outputs": []}
    with pytest.raises(ContractError) as err:
        contracts.write_json(tmp_path / "m.json", broken, "run_manifest")
    line = err.value.line()
    assert "3 violation(s)" in line
    for path in ("$.wall_seconds", "$.stage", "$.outputs"):
        assert path in line
    assert not any(tmp_path.iterdir())


def test_reader_rejects_a_hand_edited_file(tmp_path):
    path = contracts.write_json(tmp_path / "m.json", GOOD_MANIFEST, "run_manifest")
    data = json.loads(path.read_text())
    data["outputs"][0]["sha256"] = "not-a-hash"
    del data["environment"]
    path.write_text(json.dumps(data))
    with pytest.raises(ContractError, match=r"2 violation\(s\).*\$\.outputs\[0\]\.sha256"):
        contracts.read_json(path, "run_manifest")


def test_reader_errors_for_missing_and_non_json(tmp_path):
    with pytest.raises(ContractError, match="file not found.*make help"):
        contracts.read_json(tmp_path / "absent.json", "run_manifest")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ContractError, match="not valid JSON"):
        contracts.read_json(tmp_path / "bad.json", "run_manifest")


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("previous")
    with pytest.raises(RuntimeError):
        with contracts.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with contracts.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with contracts.atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("crash")
    assert [p.name for p in target.iterdir()] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def test_write_text_if_changed_keeps_mtime(tmp_path):
    path = tmp_path / "slice.json"
    assert contracts.write_text_if_changed(path, "a")
    before = path.stat().st_mtime_ns
    assert not contracts.write_text_if_changed(path, "a")
    assert path.stat().st_mtime_ns == before
    assert contracts.write_text_if_changed(path, "b")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
