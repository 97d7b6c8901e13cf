"""Where things live. Every path the stages share is named here, relative to the project root."""

from __future__ import annotations

import os
from pathlib import Path

def use_root(root: str | os.PathLike) -> None:
    """Point every shared path at a project root (tests run stages in a temporary copy)."""
    global ROOT, CONFIG_DIR, SCHEMA_DIR, DEFAULT_CONFIG, USER_OVERRIDE, DATA_DIR, RUNS_DIR, EVAL_DIR, DIST_DIR
    global STATE_DIR, CONFIG_SLICE_DIR, MODEL_MANIFEST
    ROOT = Path(root).resolve()
    CONFIG_DIR = ROOT / "config"
    SCHEMA_DIR = CONFIG_DIR / "schemas"
    DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
    USER_OVERRIDE = CONFIG_DIR / "override.yaml"
    DATA_DIR = ROOT / "data"
    RUNS_DIR = ROOT / "runs"
    EVAL_DIR = ROOT / "eval_out"
    DIST_DIR = ROOT / "dist"
    STATE_DIR = ROOT / ".state"
    CONFIG_SLICE_DIR = STATE_DIR / "config"
    MODEL_MANIFEST = RUNS_DIR / "model.manifest.json"


use_root(os.environ.get("PIPELINE_ROOT") or Path(__file__).resolve().parents[2])


def resolve(path: str | os.PathLike) -> Path:
    """A user-given path: absolute as is, `~` expanded, relative ones from the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


def display(path: str | os.PathLike) -> str:
    """A path as a person wants to read it: relative to the project root when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)
