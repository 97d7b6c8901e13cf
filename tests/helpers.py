"""Helpers the tests share."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import model as model_stage
import prepare
import train

REPO = Path(__file__).resolve().parents[1]


def error_line(caplog) -> str:
    """The one error line a stage logged (a test fails if there were none or several)."""
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    return errors[0]


def write_override(root: Path, text: str) -> Path:
    path = root / "config" / "override.yaml"
    path.write_text(text)
    return path


def make(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run make in a project copy, its output captured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    env.pop("PIPELINE_ROOT", None)
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=root, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"make {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


FAST_TRAIN = [
    "train.iters=6",
    "train.steps_per_eval=3",
    "train.val_batches=1",
    "train.num_layers=2",
    "train.learning_rate=5e-3",
]


def trained(model_dir: Path, *extra: str) -> None:
    """model → prepare → a short train run of `model_dir` in the current test project."""

    assert model_stage.main([f"model.source={model_dir}"]) == 0
    assert prepare.main([]) == 0
    assert train.main([*FAST_TRAIN, *extra]) == 0


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file in the project but .venv, the model cache and Make's bookkeeping."""
    skip = {".venv", ".cache", ".state", "__pycache__"}
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if skip & set(rel.parts) or not path.is_file() or path.is_symlink():
            continue
        out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
