"""Where things live. Every path the stages share is named here, relative to the project root."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SPLITS = ("train", "valid", "test")


def use_root(root: str | os.PathLike) -> None:
    """Point every shared path at a project root (tests run stages in a temporary copy)."""
    global ROOT, SCRIPTS_DIR, CONFIG_DIR, SCHEMA_DIR, TEMPLATE_DIR, DEFAULT_CONFIG, USER_OVERRIDE
    global DATA_DIR, RUNS_DIR, EVAL_DIR, DIST_DIR, STATE_DIR, CONFIG_SLICE_DIR
    global EXPERIMENTS_CSV, EVAL_SUMMARY
    ROOT = Path(root).resolve()
    SCRIPTS_DIR = ROOT / "scripts"
    CONFIG_DIR = ROOT / "config"
    SCHEMA_DIR = CONFIG_DIR / "schemas"
    TEMPLATE_DIR = CONFIG_DIR / "templates"
    DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
    USER_OVERRIDE = CONFIG_DIR / "override.yaml"
    DATA_DIR = ROOT / "data"
    RUNS_DIR = ROOT / "runs"
    EVAL_DIR = ROOT / "eval_out"
    DIST_DIR = ROOT / "dist"
    STATE_DIR = ROOT / ".state"
    CONFIG_SLICE_DIR = STATE_DIR / "config"
    EXPERIMENTS_CSV = RUNS_DIR / "experiments.csv"
    EVAL_SUMMARY = EVAL_DIR / "summary.md"
    use_variant(None, None)


def use_variant(model: str | None, data: str | None) -> None:
    """Point the shared stages' paths at the base model and the prepared data one experiment uses. The
    workspace's own (model, data and prepare as configured outside `experiments`) are runs/model.manifest.json
    and data/; an experiment that changes them has its own, named after what it changes: runs/model-<model>
    .manifest.json and data/<data>/ (pipeline.config.Workspace.variant)."""
    global MODEL_VARIANT, DATA_VARIANT, DATA_DIR, MODEL_MANIFEST, DATA_CONTRACT, DATA_CATALOG, DATA_REPORT
    global PREPARE_MANIFEST
    MODEL_VARIANT, DATA_VARIANT = model, data
    fields = variant_fields(model, data)
    MODEL_MANIFEST = ROOT / f"runs/model{fields['model']}.manifest.json"
    DATA_DIR = ROOT / f"data/{fields['data']}".rstrip("/")
    DATA_CONTRACT = DATA_DIR / "data_contract.json"
    DATA_CATALOG = DATA_DIR / "data_catalog.json"
    DATA_REPORT = DATA_DIR / "data_report.json"
    PREPARE_MANIFEST = DATA_DIR / "prepare.manifest.json"


def variant_fields(model: str | None, data: str | None) -> dict[str, str]:
    """What the stage registry's {model} and {data} placeholders become for a variant."""
    return {"model": f"-{model}" if model else "", "data": f"{data}/" if data else ""}


use_root(os.environ.get("PIPELINE_ROOT") or Path(__file__).resolve().parents[2])


def split_file(split: str) -> Path:
    """data/<split>.jsonl, as prepare writes it."""
    return DATA_DIR / f"{split}.jsonl"


def run_dir(experiment: str) -> Path:
    """runs/<experiment>/: an experiment's adapter, checkpoints, fused model and deployable files."""
    return RUNS_DIR / experiment


def artifacts_file(experiment: str) -> Path:
    return run_dir(experiment) / "artifacts.json"


def eval_dir(experiment: str) -> Path:
    """eval_out/<experiment>/: the experiment's report, metrics and generation policy."""
    return EVAL_DIR / experiment


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


PROJECT_FILES = ("Makefile", "config", "scripts", "requirements.lock", "requirements.in", "pytest.ini")
GENERATED = ("data", "runs", "eval_out", "dist")


def copy_project(source: Path, dest: Path) -> Path:
    """A fresh copy of the project at `source` in `dest`: its code and config (not the user's override or
    passwords), empty output folders, and .venv and the model cache shared by symlink."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        if (source / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "override.yaml", "passwords.yml")
            shutil.copytree(source / name, dest / name, ignore=ignore)
        elif (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    for folder in GENERATED:
        (dest / folder).mkdir()
    (dest / ".venv").symlink_to(source / ".venv")
    (source / ".cache").mkdir(exist_ok=True)
    (dest / ".cache").symlink_to(source / ".cache")
    return dest
