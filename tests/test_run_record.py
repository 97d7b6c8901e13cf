"""runs/<experiment>/run_manifest.yaml (pipeline.run_record): written with eval's outputs, gathered from
the stage manifests, and saying which commit of the project made it."""

from __future__ import annotations

import subprocess

from pipeline import contracts, run_record, stages
from pipeline.config import load_config
from pipeline.hashing import sha256_file
from pipeline.manifest import changed_output

import yaml

from helpers import make


def test_the_run_manifest_gathers_every_stage(finished_copy):
    path = finished_copy / "runs" / "main" / "run_manifest.yaml"
    record = run_record.read(path)
    cfg = load_config()
    assert record["experiment"] == "main" and record["config"]["train"] == dict(cfg.train)
    assert set(record["config"]) == set(cfg)  # every section, as the stages saw it
    assert record["seeds"] == {"train": cfg.train.seed, "data": cfg.data.seed}
    assert [row["stage"] for row in record["stages"]] == ["model", "prepare", "train", "fuse", "quantize", "eval"]
    for row in record["stages"][:-1]:
        manifest = contracts.read_json(stages.get(row["stage"]).manifest_path("main"), "run_manifest")
        assert row["outputs"] == stages.checked_outputs(row["stage"], manifest, "main")
        assert row["wall_seconds"] == manifest["wall_seconds"]
    for row in record["stages"]:  # every output listed is on disk with that sha256
        assert row["outputs"] and all(changed_output(entry) is None for entry in row["outputs"]), row["stage"]
    eval_manifest = contracts.read_json(stages.get("eval").manifest_path("main"), "run_manifest")
    entry = next(e for e in eval_manifest["outputs"] if e["role"] == "run_manifest")
    assert entry["sha256"] == sha256_file(path)  # eval vouches for it like any of its outputs
    assert record["inputs"]["data"] and all(e["role"] == "source" for e in record["inputs"]["data"])
    assert any(e["kind"] == "folder" for e in record["inputs"]["base_model"])
    env = record["environment"]
    assert env["requirements_lock"] == {"path": "requirements.lock", "sha256": sha256_file("requirements.lock")}
    assert {"mlx", "mlx-lm", "llama-cpp-python"} <= set(env["packages"]) and env["cpu_count"] >= 1
    code = record["code"]
    assert code["commit"] is None and code["dirty"] is None  # the test's copy is not a git checkout
    assert code["files_sha256"] == run_record.code_digest() and code["files"] == len(run_record.code_files())
    assert {"Makefile", "scripts/eval/__init__.py", "config/default.yaml"} <= set(run_record.code_files())
    assert yaml.safe_load(path.read_text())["wall_seconds"] >= sum(r["wall_seconds"] for r in record["stages"][:2])


def test_the_run_manifest_records_the_commit_and_a_dirty_tree(finished_copy):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=finished_copy, check=True)
    notes = finished_copy / "NOTES.md"
    notes.write_text("first\n")
    subprocess.run([*git, "add", "Makefile", "scripts", "config", "NOTES.md"], cwd=finished_copy, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=finished_copy, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=finished_copy, capture_output=True, text=True).stdout
    assert run_record.git_state() == {"commit": head.strip(), "dirty": False}
    notes.write_text("second\n")  # a tracked file no stage reads
    assert run_record.git_state() == {"commit": head.strip(), "dirty": True}
    make(finished_copy, "eval", "SET=eval.max_tokens=7")  # eval runs again, and only eval
    record = run_record.read(finished_copy / "runs" / "main" / "run_manifest.yaml")
    assert (record["code"]["commit"], record["code"]["dirty"]) == (head.strip(), True)
