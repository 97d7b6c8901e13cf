"""Frozen experiments: what a bundle from `make freeze` must hold and how one is verified.

A bundle is a sparse copy of the workspace (the same relative paths: runs/<experiment>/run_manifest.yaml,
runs/<experiment>/adapter/, the shipped artifact, data/data_contract.json, eval_out/<experiment>/...)
plus config.yaml (the resolved config), the requirements lock, README.md and SHA256SUMS. Verifying it
checks, without extracting anything: every SHA256SUMS line; the run manifest's schema and version; that
the requirements lock is the one the manifest records; that each file or folder the manifest records as
a stage output, and the bundle holds, has the recorded sha256; and that the files every bundle needs are
there.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from pipeline import bundle, contracts, hashing, run_record
from pipeline.errors import PipelineError

import orjson
import yaml

RUN_MANIFEST_GLOB = "runs/*/run_manifest.yaml"
TOP_LEVEL = ("config.yaml", "README.md")
WHOLE_FOLDERS = {("train", "adapter")}  # recorded folders a bundle holds whole


def run_manifest_name(contents: bundle.Contents) -> str | None:
    found = sorted(name for name in contents.files if fnmatch.fnmatch(name, RUN_MANIFEST_GLOB))
    return found[0] if len(found) == 1 else None


def verify(path: Path) -> tuple[dict | None, list[str]]:
    """(the bundle's run manifest, every problem found, one line each). A file that is not a readable
    bundle raises PipelineError."""
    contents = bundle.check(path)
    problems = list(contents.problems)
    manifest_name = run_manifest_name(contents)
    if manifest_name is None:
        return None, [*problems, f"{RUN_MANIFEST_GLOB}: the bundle holds no single run manifest"]
    record, problem = _record(contents, manifest_name)
    if problem:
        return None, [*problems, problem]
    problems += _lock_problems(record, contents)
    problems += _recorded_output_problems(record, contents)
    problems += _missing(record, contents)
    return record, problems


def _record(contents: bundle.Contents, name: str) -> tuple[dict | None, str | None]:
    try:
        record = yaml.safe_load(contents.data(name) or b"")
    except yaml.YAMLError as exc:
        return None, f"{name}: not valid YAML ({exc.__class__.__name__})"
    if not isinstance(record, dict):
        return None, f"{name}: not a run manifest"
    ours = contracts.schema_version(run_record.SCHEMA)
    theirs = record.get("schema_version")
    if isinstance(theirs, int) and theirs > ours:
        return None, (
            f"{name}: schema version {theirs} is newer than this pipeline reads ({ours}); "
            "update the pipeline (git pull) to verify it"
        )
    problems = contracts.violations(record, run_record.SCHEMA)
    if problems:
        return None, f"{name}: does not match its schema: {problems[0]}"
    return record, None


def _lock_problems(record: dict, contents: bundle.Contents) -> list[str]:
    lock = record["environment"]["requirements_lock"]
    found = contents.files.get(lock["path"])
    if found is None:
        return [f"{lock['path']}: missing (the manifest records the environment by it)"]
    if found[0] != lock["sha256"]:
        return [f"{lock['path']}: sha256 {found[0]}, but the run manifest records {lock['sha256']}"]
    return []


def _recorded_output_problems(record: dict, contents: bundle.Contents) -> list[str]:
    """Each recorded file the bundle holds, each folder it holds whole (the adapter), and each artifact of
    artifacts.json it holds (itself checked as a recorded file) against the sha256 recorded for it."""
    problems = []
    for row in record["stages"]:
        for entry in row["outputs"]:
            if entry.get("kind") == "folder" and (row["stage"], entry["role"]) not in WHOLE_FOLDERS:
                continue  # bundled in part at most (one file of quantized/): its artifacts are checked below
            digest = digest_in_bundle(entry, contents)
            if digest is not None and digest != entry["sha256"]:
                problems.append(
                    f"{entry['path']}: sha256 {digest}, but the run manifest records {entry['sha256']} "
                    f"({row['stage']}'s {entry['role']})"
                )
    return problems + _artifact_problems(record, contents)


def _artifact_problems(record: dict, contents: bundle.Contents) -> list[str]:
    name = f"runs/{record['experiment']}/artifacts.json"
    raw = contents.data(name)
    if raw is None:
        return []  # _missing names it
    try:
        artifacts = orjson.loads(raw)["artifacts"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return [f"{name}: not an artifacts list"]
    problems = []
    recorded = {entry["path"] for row in record["stages"] for entry in row["outputs"]}
    for artifact in (a for a in artifacts if a["path"] not in recorded):  # the adapter is checked as train's
        entry = {"path": artifact["path"], "kind": "folder" if _is_folder(artifact, contents) else "file"}
        digest = digest_in_bundle(entry, contents)
        if digest is not None and digest != artifact["sha256"]:
            problems.append(f"{artifact['path']}: sha256 {digest}, but {name} records {artifact['sha256']}")
    return problems


def _is_folder(artifact: dict, contents: bundle.Contents) -> bool:
    return artifact["path"] not in contents.files and any(
        name.startswith(artifact["path"].rstrip("/") + "/") for name in contents.files
    )


def digest_in_bundle(entry: dict, contents: bundle.Contents) -> str | None:
    """The sha256 a recorded output has inside the bundle (a folder's the way hashing.sha256_tree makes
    it), or None when the bundle does not hold it."""
    if entry.get("kind") != "folder":
        found = contents.files.get(entry["path"])
        return found[0] if found else None
    prefix = entry["path"].rstrip("/") + "/"
    inside = {name[len(prefix) :]: digest for name, (digest, _) in contents.files.items() if name.startswith(prefix)}
    return hashing.tree_digest_of(inside) if inside else None


def required_files(record: dict, policy: dict | None) -> list[tuple[str, str]]:
    """(path, what it is) of everything a bundle of this experiment must hold."""
    lock = record["environment"]["requirements_lock"]["path"]
    experiment = record["experiment"]
    needed = [(name, name) for name in TOP_LEVEL] + [(lock, "the requirements lock")]
    needed.append((f"eval_out/{experiment}/generation_policy.json", "the generation policy"))
    needed.append((f"runs/{experiment}/artifacts.json", "the artifacts list"))
    for row in record["stages"]:
        for entry in row["outputs"]:
            if (row["stage"], entry["role"]) in (("train", "adapter"), ("prepare", "data_contract")):
                needed.append((entry["path"], f"the {entry['role'].replace('_', ' ')}"))
    if policy and policy.get("ship"):
        needed.append((policy["ship"]["path"], "the artifact the generation policy ships"))
    return needed


def _missing(record: dict, contents: bundle.Contents) -> list[str]:
    policy_name = f"eval_out/{record['experiment']}/generation_policy.json"
    raw = contents.data(policy_name)
    try:
        policy = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return [f"{policy_name}: not valid JSON"]
    problems = []
    for name, what in required_files(record, policy):
        prefix = name.rstrip("/") + "/"
        if name not in contents.files and not any(n.startswith(prefix) for n in contents.files):
            problems.append(f"{name}: missing ({what}, which every bundle holds)")
    return problems


def existing_bundle(given: str | None, goal: str) -> Path:
    if not given:
        raise PipelineError(
            "no bundle given", where="BUNDLE", fix=f"make {goal} BUNDLE=dist/<experiment>-<hash>.tar.gz"
        )
    path = Path(given).expanduser()
    if not path.is_file():
        raise PipelineError("no such file", where=given, fix="give the path of a bundle that make freeze wrote")
    return path


def describe(problems: list[str], path: Path) -> PipelineError:
    return PipelineError(
        f"{len(problems)} problem{'s' if len(problems) != 1 else ''}: {problems[0]}"
        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
        where=str(path),
        fix="the bundle was changed or damaged after it was made: get a fresh copy from where it was frozen",
    )
