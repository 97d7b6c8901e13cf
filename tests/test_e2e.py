"""End to end: `make all` on the real default model and config, as a user types it (~4 minutes)."""

from __future__ import annotations

import json

import pytest

from helpers import make
from pipeline import contracts


@pytest.mark.slow
def test_make_all_on_the_default_model_then_nothing_to_do(project):
    first = make(project, "all")
    assert "base model ready" in first.stderr
    manifest = contracts.read_json(project / "runs" / "model.manifest.json", "run_manifest")
    assert manifest["environment"]["blas"] in ("openblas", "accelerate")
    assert manifest["details"]["rope_theta"] == 100000.0
    assert manifest["details"]["parameters"] > 100_000_000
    model_dir = project / manifest["outputs"][0]["path"]
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "llama"
    catalog = contracts.read_json(project / "data" / "data_catalog.json", "data_catalog")
    assert catalog["splits"]["test"]["records"] >= 100
    report = contracts.read_json(project / "data" / "data_report.json", "data_report")
    assert report["splits"]["train"]["tokens"]["total"] == catalog["splits"]["train"]["tokens"] > 0
    assert (project / "data" / "data_report.md").read_text().startswith("# Data report")
    train_manifest = contracts.read_json(project / "runs" / "main" / "train.manifest.json", "run_manifest")
    details = train_manifest["details"]
    assert train_manifest["wall_seconds"] < 300, train_manifest["wall_seconds"]
    assert details["best_val_loss"] < 0.5 * details["first_val_loss"], details
    assert (project / "runs" / "main" / "loss.png").is_file()
    fuse_manifest = contracts.read_json(project / "runs" / "main" / "fuse.manifest.json", "run_manifest")
    assert fuse_manifest["details"]["max_logit_difference"] < 1e-3
    artifacts = contracts.read_json(project / "runs" / "main" / "artifacts.json", "artifacts")["artifacts"]
    assert [a["kind"] for a in artifacts] == ["base", "adapter", "fused"]
    second = make(project, "all")
    assert "Nothing to be done for 'all'" in second.stdout
