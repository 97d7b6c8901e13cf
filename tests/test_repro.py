"""repro.sh: from a thawed bundle, in a fresh folder, the experiment is replayed and every artifact's sha256
matches the recorded one; a dataset that changed since stops the replay naming the file and both hashes."""

from __future__ import annotations

import os
import re
import subprocess

from pipeline.hashing import sha256_file

import pytest

from helpers import REPO, make


def reusable_venv() -> str:
    """The project's .venv, made by `make setup` from requirements.lock (its stamp vouches for that); a
    .venv older than the lock.sha256 file `make setup` now writes gets it here."""
    venv = REPO / ".venv"
    assert (venv / ".setup-requirements.stamp").is_file()
    marker = venv / "lock.sha256"
    if not marker.is_file():
        marker.write_text(sha256_file(REPO / "requirements.lock") + "\n")
    return str(venv)


def replay(script, replay_dir, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS", "PIPELINE_"))}
    clean.update(REPRO_VENV=reusable_venv(), REPRO_DIR=str(replay_dir), **env)
    return subprocess.run(["bash", str(script)], env=clean, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_thawed_bundle_replays_bit_for_bit(finished_copy, tmp_path):
    make(finished_copy, "freeze")
    (bundle,) = (finished_copy / "dist").glob("main-*.tar.gz")
    thawed = tmp_path / "thawed"
    make(finished_copy, "thaw", f"BUNDLE={bundle}", f"DEST={thawed}")
    result = replay(thawed / "eval_out" / "main" / "repro.sh", tmp_path / "replay")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if re.match(r"(PASS|FAIL) ", line)]
    ids = {line.split()[1] for line in lines}
    assert {"base", "main/adapter", "main/fused", "main/main-f16.gguf"} <= ids, lines
    assert all(line.startswith("PASS ") for line in lines), lines
    assert re.search(r"^repro: (\d+) of \1 artifacts identical$", result.stdout, re.M), result.stdout
    assert (tmp_path / "replay" / "runs" / "main" / "adapter").is_dir()
    assert not (thawed / "runs" / "main" / "fused").exists()  # the replay wrote into its own folder only


@pytest.mark.slow
def test_a_changed_dataset_stops_the_replay_naming_it(finished_copy, tmp_path):
    data = finished_copy / "qa.jsonl"
    lines = [f'{{"prompt": "Q{i}?", "completion": "A{i}."}}' for i in range(60)]
    data.write_text("\n".join(lines) + "\n")
    make(finished_copy, "eval", "SET=data.source=qa.jsonl data.format=completions")
    data.write_text("\n".join(lines[:-1]) + "\n")
    result = replay(finished_copy / "eval_out" / "main" / "repro.sh", tmp_path / "replay")
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "qa.jsonl" in error[0] and "the run manifest records" in error[0], result.stderr
    assert not (tmp_path / "replay" / "runs" / "main").exists()  # stopped before any stage ran
