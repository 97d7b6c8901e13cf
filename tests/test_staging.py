"""pipeline.staging: outputs and manifest are swapped in together; a failure or a kill during the swap
gives back the previous outputs and manifest byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline import paths, staging

import pytest

from helpers import REPO


def previous_run(root):
    (root / "runs" / "x" / "adapter").mkdir(parents=True)
    (root / "runs" / "x" / "adapter" / "w").write_text("old weights")
    (root / "runs" / "x" / "metrics.jsonl").write_text("old metrics\n")
    (root / "runs" / "x" / "train.manifest.json").write_text("old manifest")


def new_run(run: staging.Staging, root):
    adapter = run.path(root / "runs" / "x" / "adapter")
    adapter.mkdir()
    (adapter / "w").write_text("new weights")
    run.path(root / "runs" / "x" / "metrics.jsonl").write_text("new metrics\n")


def contents(root) -> dict:
    return {
        str(p.relative_to(root)): p.read_text()
        for p in (root / "runs").rglob("*")
        if p.is_file() and ".staging" not in str(p)
    }


def test_commit_swaps_outputs_and_manifest_and_leaves_no_staging(project):
    previous_run(project)
    run = staging.Staging("train", "x")
    new_run(run, project)
    run.commit(project / "runs/x/train.manifest.json", lambda p: p.write_text("new manifest"))
    assert contents(project) == {
        "runs/x/adapter/w": "new weights",
        "runs/x/metrics.jsonl": "new metrics\n",
        "runs/x/train.manifest.json": "new manifest",
    }
    assert not any(".staging" in str(p) for p in project.rglob("*"))


def test_a_failure_during_the_swap_puts_everything_back(project, monkeypatch):
    previous_run(project)
    before = contents(project)
    run = staging.Staging("train", "x")
    new_run(run, project)
    real_replace, calls = os.replace, []

    def fail_on_the_fourth(src, dst):
        calls.append(dst)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_the_fourth)
    with pytest.raises(OSError):
        run.commit(project / "runs/x/train.manifest.json", lambda p: p.write_text("new manifest"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert contents(project) == before


KILLED_COMMIT = """
import os, sys
from pathlib import Path
from pipeline import paths, staging
root = Path(sys.argv[1]); paths.use_root(root)
run = staging.Staging("train", "x")
adapter = run.path(root / "runs/x/adapter"); adapter.mkdir(); (adapter / "w").write_text("new weights")
run.path(root / "runs/x/metrics.jsonl").write_text("new metrics\\n")
real, n = os.replace, [0]
def replace(src, dst):
    n[0] += 1
    real(src, dst)
    if n[0] == int(sys.argv[2]):
        os._exit(9)  # as a kill -9 would: no cleanup, no rollback
os.replace = replace
run.commit(root / "runs/x/train.manifest.json", lambda p: p.write_text("new manifest"))
"""


@pytest.mark.parametrize("killed_after", [1, 2, 3, 4, 5, 6])
def test_a_kill_during_the_swap_is_rolled_back_by_the_next_run(project, killed_after):
    previous_run(project)
    before = contents(project)
    env = {**os.environ, "PYTHONPATH": str(REPO / "scripts")}
    result = subprocess.run([sys.executable, "-c", KILLED_COMMIT, str(project), str(killed_after)], env=env)
    assert result.returncode == 9
    assert (paths.STATE_DIR / "commits" / "train-x.json").is_file()
    staging.Staging("train", "x")  # the next run of the stage
    assert contents(project) == before
    assert not (paths.STATE_DIR / "commits" / "train-x.json").exists()
