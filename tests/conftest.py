"""Shared fixtures: a tiny model, and a temporary copy of the project for stage and Make tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pipeline  # noqa: F401  (loads the fast BLAS before anything imports MLX)
from pipeline import paths

import pytest

import model as model_stage
from fixtures.tiny_model import build_tiny_model
from helpers import REPO, make, write_override


def pytest_collection_modifyitems(items):
    """The slow tests first (the sort keeps the order otherwise): on two workers (`make test`) the longest
    then overlap the many short ones, instead of one running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def new_project(root: Path) -> Path:
    """A fresh copy of the project at `root`, sharing .venv and the model cache."""
    return paths.copy_project(REPO, root)


@pytest.fixture
def base(project, tiny_model_dir) -> Path:
    """A project whose base model is the tiny one (ChatML template, byte-level BPE), converted."""
    assert model_stage.main([f"model.source={tiny_model_dir}"]) == 0
    return project


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A fresh copy of the project (sharing .venv and the model cache), with pipeline.paths pointed at it."""
    root = new_project(tmp_path / "project")
    paths.use_root(root)
    monkeypatch.setenv("PIPELINE_ROOT", str(root))
    yield root
    paths.use_root(REPO)


# The whole pipeline on the tiny model, briefly; save_every=2 leaves a checkpoint to resume from.
BRIEF = """
train: {iters: 4, steps_per_eval: 2, val_batches: 1, num_layers: 2, save_every: 2}
quantize: {mlx: [], gguf_types: [], check_prompts: 1, check_max_tokens: 8, perplexity_records: 2}
eval: {records: 4, max_tokens: 8}
"""


@pytest.fixture(scope="session")
def finished(tmp_path_factory, tiny_model_dir) -> Path:
    """A project where `make all` succeeded on the tiny model."""
    root = new_project(tmp_path_factory.mktemp("finished") / "project")
    write_override(root, f"model:\n  source: {tiny_model_dir}\n{BRIEF}")
    make(root, "all")
    return root


@pytest.fixture
def finished_copy(finished, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "project"
    shutil.copytree(finished, root, symlinks=True, ignore=shutil.ignore_patterns(".state"))
    paths.use_root(root)
    monkeypatch.setenv("PIPELINE_ROOT", str(root))
    monkeypatch.chdir(root)
    yield root
    paths.use_root(REPO)
