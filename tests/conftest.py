"""Shared fixtures: a tiny model, and a temporary copy of the project for stage and Make tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pipeline  # noqa: F401  (loads the fast BLAS before anything imports MLX)
from pipeline import paths

import pytest

from fixtures.tiny_model import build_tiny_model
from helpers import REPO

PROJECT_FILES = ("Makefile", "config", "scripts", "requirements.lock", "requirements.in", "pytest.ini")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def new_project(root: Path) -> Path:
    """A fresh copy of the project at `root`, sharing .venv and the model cache."""
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "override.yaml"))
        else:
            shutil.copy2(source, root / name)
    for folder in ("data", "runs", "eval_out", "dist"):
        (root / folder).mkdir()
    (root / ".venv").symlink_to(REPO / ".venv")
    (REPO / ".cache").mkdir(exist_ok=True)
    (root / ".cache").symlink_to(REPO / ".cache")
    return root


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A fresh copy of the project (sharing .venv and the model cache), with pipeline.paths pointed at it."""
    root = new_project(tmp_path / "project")
    paths.use_root(root)
    monkeypatch.setenv("PIPELINE_ROOT", str(root))
    yield root
    paths.use_root(REPO)
