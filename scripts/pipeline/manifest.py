"""The run manifest every stage writes last (schema run_manifest): config, inputs, outputs, environment.

A stage writes its outputs at staging paths (`StageRun.staged`) and `StageRun.finish` swaps them in
together with the manifest (see pipeline.staging), so a stage that fails or is killed leaves the outputs
of the last successful run, and their manifest, exactly as they were.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from pathlib import Path

from pipeline import contracts, paths, runtime
from pipeline.errors import ContractError
from pipeline.hashing import Sha256Cache
from pipeline.staging import Staging


def digests() -> Sha256Cache:
    return _digests(paths.STATE_DIR / "sha256-cache.json")


@functools.cache
def _digests(path: Path) -> Sha256Cache:
    return Sha256Cache(path)


def file_entry(role: str, path: str | Path, recorded_as: str | Path | None = None) -> dict:
    """{"role", "path", "sha256", "bytes", "kind"} of a file or folder; `recorded_as` is the path recorded
    when the content is read from elsewhere (a staging path)."""
    path = Path(path)
    shown = paths.display(recorded_as if recorded_as is not None else path)
    if path.is_dir():
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        entry = {"role": role, "path": shown, "sha256": digests().tree(path), "bytes": size, "kind": "folder"}
    else:
        entry = {"role": role, "path": shown, "sha256": digests().file(path), "bytes": path.stat().st_size}
        entry["kind"] = "file"
    digests().save()
    return entry


def changed_output(entry: dict) -> str | None:
    """Why a recorded output no longer is what the manifest says ("missing", "changed"), or None."""
    path = paths.resolve(entry["path"])
    if not path.exists():
        return "missing"
    is_dir = entry.get("kind") == "folder"
    if path.is_dir() != is_dir:
        return "changed"
    if not is_dir and path.stat().st_size != entry["bytes"]:
        return "changed"
    actual = digests().tree(path) if is_dir else digests().file(path)
    digests().save()
    return None if actual == entry["sha256"] else "changed"


class StageRun:
    """Times a stage, stages its outputs and writes its manifest:
    `run = StageRun("train", cfg_sections, experiment)` … `run.staged(path)` … `run.finish(path, ...)`."""

    def __init__(self, stage: str, config: dict, experiment: str | None = None):
        self.stage, self.config, self.experiment = stage, config, experiment
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self._start = time.monotonic()
        self.staging = Staging(stage, experiment)

    def elapsed(self) -> float:
        return round(time.monotonic() - self._start, 3)

    def staged(self, final: str | Path, keep: bool = False) -> Path:
        """Where to write the output `final` (finish moves it there); `keep`: work a resumed run continues."""
        return self.staging.path(Path(final), keep=keep)

    def entry(self, role: str, final: str | Path) -> dict:
        """The manifest entry of an output, hashed where its new content is (staged or not)."""
        return file_entry(role, self.staging.source(Path(final)), recorded_as=final)

    def finish(
        self, manifest_path: str | Path, inputs: list[dict], outputs: list[dict], details: dict | None = None
    ) -> dict:
        manifest = {
            "stage": self.stage,
            "experiment": self.experiment,
            "config": self.config,
            "inputs": inputs,
            "outputs": outputs,
            "environment": runtime.environment(),
            "started_at": self.started_at,
            "wall_seconds": self.elapsed(),
            "details": details or {},
        }
        contracts.validate(
            {"schema_version": contracts.schema_version("run_manifest"), **manifest},
            "run_manifest",
            where=f"writing {paths.display(manifest_path)}",
        )
        self.staging.commit(Path(manifest_path), lambda path: contracts.write_json(path, manifest, "run_manifest"))
        return manifest


def output_entry(manifest: dict, role: str) -> dict:
    """The output with this role in a manifest read back from disk ({"role", "path", "sha256", ...})."""
    for entry in manifest["outputs"]:
        if entry["role"] == role:
            return entry
    raise ContractError(
        f"the {manifest['stage']} manifest lists no '{role}' output",
        where=f"{manifest['stage']}.manifest.json",
        fix=f"re-run `make {manifest['stage']}`",
    )


def output_path(manifest: dict, role: str) -> Path:
    """The path of the output with this role in a manifest read back from disk."""
    return paths.resolve(output_entry(manifest, role)["path"])
