"""Disk space, checked before a stage writes anything large."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import paths
from pipeline.errors import PipelineError

MARGIN_BYTES = 50_000_000  # manifests, configs and tokenizers besides the weights


def require_free_space(folder: Path, needed_bytes: int, what: str, fix: str) -> None:
    """Stop before writing `what` into `folder` when the disk cannot hold it (plus 10% and a margin)."""
    needed = int(needed_bytes * 1.1) + MARGIN_BYTES
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise PipelineError(
            f"writing {what} needs about {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free",
            where=paths.display(folder),
            fix=fix,
        )
