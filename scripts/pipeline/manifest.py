"""The run manifest every stage writes last (schema run_manifest): config, inputs, outputs, environment."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from pipeline import contracts, paths, runtime
from pipeline.errors import ContractError
from pipeline.hashing import sha256_file, sha256_tree


def file_entry(role: str, path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return {"role": role, "path": paths.display(path), "sha256": sha256_tree(path), "bytes": size, "kind": "folder"}
    return {
        "role": role,
        "path": paths.display(path),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "kind": "file",
    }


class StageRun:
    """Times a stage and writes its manifest: `run = StageRun("model", cfg_sections)` … `run.finish(path, ...)`."""

    def __init__(self, stage: str, config: dict, experiment: str | None = None):
        self.stage, self.config, self.experiment = stage, config, experiment
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self._start = time.monotonic()

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
            "wall_seconds": round(time.monotonic() - self._start, 3),
            "details": details or {},
        }
        contracts.write_json(manifest_path, manifest, "run_manifest")
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
