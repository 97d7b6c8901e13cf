"""eval's score cache: each artifact's scores (loss, answers, speed) from an earlier run, reused while
nothing that determines them has changed, so a run after a failure scores only what failed.

One file per artifact, .state/eval/<experiment>/scores/<artifact id>.json (written atomically; removed
with .state by `make clean`): {"key": ..., "result": ...}. The key holds everything the scores depend
on: the artifact's sha256 (and its parent's, for an adapter loaded onto the base), the eval settings
used while scoring, the test split's sha256, the chat template's and tokenizer's sha256, the code that
scores and the library versions. The task metrics are not cached: they are computed from the answers
on every run, so a new metric or plugin needs no model run.

Not under eval_out/<experiment>/: that folder is replaced whole when a run's outputs are swapped in,
and the cache has to outlive a run whose outputs are not.
"""

from __future__ import annotations

import logging
import urllib.parse
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipeline import contracts, hashing, paths, runtime, stages
from pipeline.manifest import file_entry

import orjson

log = logging.getLogger("eval")

KEY_VERSION = 1
BASE_ID = "base"  # the base model's artifact id: the same artifact in every experiment on that model
# eval settings that act on the answers after scoring (or pick what is scored, or how many at once), not on
# any one score
AFTER_SCORING = ("artifacts", "task_metric", "plugins", "examples", "ship", "workers")
# eval's modules that only read the answers and scores (the rest of eval, and what it imports, scores)
NOT_SCORING = ("metrics.py", "report.py", "verdict.py")


def common_key(eval_slice: dict, contract: dict) -> dict:
    """The part of every artifact's key that does not depend on the artifact."""
    test_split = paths.resolve(contract["splits"]["test"])
    return {
        "version": KEY_VERSION,
        "eval": {k: v for k, v in eval_slice.items() if k not in AFTER_SCORING},
        "data": {
            "test_split_sha256": file_entry("test_split", test_split)["sha256"] if test_split.is_file() else None,
            "format": contract["format"],
            "template_sha256": contract["template"]["sha256"],
            "max_seq_length": contract["max_seq_length"],
            "tokenizer_sha256": contract["tokenizer"]["sha256"],
        },
        "code_sha256": code_sha256(),
        "versions": {**runtime.versions(), "llama-cpp-python": _version("llama_cpp_python")},
        "device": runtime.device_name(),
    }


def artifact_key(artifact: dict, artifacts: list[dict], common: dict) -> dict:
    by_id = {a["id"]: a for a in artifacts}
    loaded = [artifact]
    if artifact["kind"] == "adapter":  # loaded onto its parent (the base model)
        loaded.insert(0, by_id[artifact["parent"]])
    return {
        "artifact": {"id": artifact["id"], "kind": artifact["kind"]},
        "sha256": [a["sha256"] for a in loaded],
        **common,
    }


def code_sha256() -> str:
    files = [p for p in stages.code_files("eval") if not (p.parent.name == "eval" and p.name in NOT_SCORING)]
    return hashing.sha256_json({paths.display(p): hashing.sha256_file(p) for p in files})


def cache_path(experiment: str, artifact_id: str) -> Path:
    return paths.STATE_DIR / "eval" / experiment / "scores" / (urllib.parse.quote(artifact_id, safe="-_.") + ".json")


def shared_path(key: dict) -> Path:
    """Where the base model's scores are kept for every experiment: its key says everything they depend
    on (its sha256, the test split, the settings, the code), so experiments on the same model and data
    with the same eval settings score it once."""
    return paths.STATE_DIR / "eval" / "_shared" / f"{hashing.sha256_json(key)[:32]}.json"


def cached(experiment: str, artifact_id: str, key: dict) -> dict | None:
    """The result recorded for this artifact under this key, or None (never scored, or something changed)."""
    found = _read(cache_path(experiment, artifact_id), artifact_id, key)
    if found is None and artifact_id == BASE_ID:
        found = _read(shared_path(key), artifact_id, key)
    return found


def _read(path: Path, artifact_id: str, key: dict) -> dict | None:
    try:
        entry = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:  # a damaged cache entry is only a miss
        log.debug("%s: ignoring the unreadable score cache %s: %s", artifact_id, paths.display(path), exc)
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("result"), dict):
        return None
    return entry["result"]


def save(experiment: str, artifact_id: str, key: dict, result: dict) -> None:
    data = orjson.dumps({"key": key, "result": result}, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    contracts.write_bytes_atomic(cache_path(experiment, artifact_id), data + b"\n")
    if artifact_id == BASE_ID:
        contracts.write_bytes_atomic(shared_path(key), data + b"\n")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
