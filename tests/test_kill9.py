"""kill -9 at a random moment of each stage, after a successful `make all`: every manifest still matches
its outputs (sha256), nothing half-written is left where a later stage reads, and the next `make all`
completes, ending where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline import stages

import pytest

from helpers import REPO, make

# A setting each stage reads, changed so that the killed run would have replaced the previous outputs.
CHANGES = {
    "prepare": "data.seed=1",
    "train": "train.seed=1",
    "fuse": "fuse.tolerance=0.5",
    "quantize": "quantize.check_prompts=2",
    "eval": "eval.records=3",
}
OUTPUT_FOLDERS = ("data", "runs", "eval_out")


def stage_command(root: Path, stage: str) -> list[str]:
    return [sys.executable, "-m", stage, CHANGES[stage]]


def start(root: Path, stage: str) -> subprocess.Popen:
    env = {**os.environ, "PIPELINE_ROOT": str(root), "PYTHONPATH": str(REPO / "scripts"), "CI": "1"}
    return subprocess.Popen(
        stage_command(root, stage), cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def visible_files(root: Path) -> set[str]:
    """Files a later stage could read: under the output folders, in no hidden (staging) folder."""
    found = set()
    for folder in OUTPUT_FOLDERS:
        for path in (root / folder).rglob("*"):
            rel = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                found.add(str(rel))
    return found


def manifests_match(root: Path) -> dict[str, list[str]]:
    from pipeline import paths

    paths.use_root(root)
    try:
        return stages.stale_stages("main")
    finally:
        paths.use_root(REPO)


def copy(finished: Path, to: Path) -> Path:
    shutil.copytree(finished, to, symlinks=True, ignore=shutil.ignore_patterns(".state"))
    return to


@pytest.mark.parametrize("stage", list(CHANGES))
def test_kill_9_at_a_random_moment_keeps_every_output_valid(stage, finished, tmp_path):
    straight = copy(finished, tmp_path / "straight")
    began = time.monotonic()
    done = start(straight, stage)
    assert done.wait() == 0, done.stderr.read()
    duration = time.monotonic() - began
    after_straight = visible_files(straight)

    killed = copy(finished, tmp_path / "killed")
    before = visible_files(killed)
    delay = random.Random().uniform(0.2, duration)
    process = start(killed, stage)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    context = f"{stage} killed after {delay:.2f} s of {duration:.2f} s"

    # the killed stage and those before it vouch for their outputs; a later one may be out of date, for Make
    # to run again, when the killed run got as far as replacing the outputs it reads
    later = stages.PIPELINE[stages.PIPELINE.index(stage) + 1 :]
    assert set(manifests_match(killed)) <= set(later), context
    leftover = visible_files(killed) - before - after_straight
    assert not leftover, f"{context}: half-written files where a later stage reads: {sorted(leftover)}"

    make(killed, "all", f"SET={CHANGES[stage]}")
    assert manifests_match(killed) == {}, context
    if stage != "eval":  # eval's report records how long each artifact took
        assert output_digests(killed, stage) == output_digests(straight, stage), context


def output_digests(root: Path, stage: str) -> dict[str, str]:
    manifest = json.loads((root / stages.get(stage).manifest_for("main")).read_text())
    timed = {"metrics"}  # train's metrics.jsonl records seconds and tokens per second
    return {entry["path"]: entry["sha256"] for entry in manifest["outputs"] if entry["role"] not in timed}
