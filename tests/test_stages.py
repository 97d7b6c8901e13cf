"""The stage registry: the Makefile, the config and the code agree with it, and upstream reads say what to run."""

from __future__ import annotations

import re

from pipeline import contracts, paths, stages
from pipeline.errors import PipelineError
from pipeline.manifest import file_entry

import pytest
import yaml

from helpers import REPO


def stage_of(path) -> str | None:
    """The stage a file of scripts/ belongs to, or None for the shared packages."""
    relative = path.relative_to(paths.SCRIPTS_DIR)
    name = relative.parts[0].removesuffix(".py")
    return name if name in stages.STAGES else None


@pytest.mark.parametrize("name", sorted(stages.STAGES))
def test_no_stage_imports_another_stages_code(name):
    files = stages.code_files(name)
    assert files, name
    others = sorted({stage_of(p) for p in files} - {name, None})
    assert not others, f"{name} imports code of {others}: share it through pipeline/ or llm/ instead"


def test_code_files_follow_imports_into_the_shared_packages():
    quantize = {p.relative_to(paths.SCRIPTS_DIR).as_posix() for p in stages.code_files("quantize")}
    assert {"quantize/ollama.py", "lm/hf_to_gguf.py", "lm/gguf_mapping.py", "lm/chat_template.py"} <= quantize
    model = {p.relative_to(paths.SCRIPTS_DIR).as_posix() for p in stages.code_files("model")}
    assert "lm/gguf_to_hf.py" in model and "lm/llama_runner.py" not in model and "lm/tokens.py" not in model


def test_makefile_targets_are_the_registry_manifests():
    makefile = (REPO / "Makefile").read_text()
    for name in stages.PIPELINE:
        manifest = stages.get(name).manifest.format(experiment="$(EXP_NAME)")
        assert re.search(rf"^{name}: {re.escape(manifest)}$", makefile, re.M), name
        assert re.search(rf"^{re.escape(manifest)}: \$\({name}_DEPS\) \| \$\(SETUP_STAMP\)$", makefile, re.M), name
        assert f"$(RUN_STAGE) {name} $(STAGE_ARGS)" in makefile, name
    assert re.search(r"^all: " + " ".join(stages.PIPELINE) + "$", makefile, re.M)


def test_every_config_section_is_read_by_exactly_one_stage():
    sections = set(yaml.safe_load((REPO / "config" / "default.yaml").read_text())) - {"experiments"}
    claimed = [s for stage in stages.STAGES.values() for s in stage.sections]
    assert sorted(claimed) == sorted(sections)


def test_experiment_sections_are_those_of_the_per_experiment_stages():
    assert stages.experiment_sections() == {"train", "fuse", "quantize", "eval"}


def test_make_include_lists_code_slices_and_upstream_manifests(project):
    include = stages.make_include("exp1")
    deps = dict(line.split(" := ", 1) for line in include.splitlines() if " := " in line)
    assert "scripts/quantize/ollama.py" in deps["quantize_DEPS"].split()
    assert "runs/exp1/.config/quantize.json" in deps["quantize_DEPS"].split()
    assert "runs/exp1/fuse.manifest.json" in deps["quantize_DEPS"].split()
    assert ".state/config/prepare.json" in deps["prepare_DEPS"].split()
    assert "$(wildcard config/templates/*.jinja)" in deps["prepare_DEPS"]
    assert "scripts/quantize/ollama.py" not in deps["eval_DEPS"].split()


def test_a_missing_upstream_manifest_says_which_make_to_run(project):
    with pytest.raises(PipelineError) as err:
        stages.read_manifest("train", "exp1")
    assert "experiment 'exp1' has no trained adapter yet" in err.value.line()
    assert "run `make train EXP=exp1` first" in err.value.line()
    with pytest.raises(PipelineError, match=r"there is no converted base model yet.*make model"):
        stages.read_manifest("model")


def test_a_deleted_or_changed_output_of_an_upstream_stage_is_reported(project):
    folder = paths.run_dir("main") / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapters.safetensors").write_bytes(b"weights")
    manifest = {
        "stage": "train",
        "experiment": "main",
        "config": {},
        "inputs": [],
        "details": {},
        "outputs": [file_entry("adapter", folder)],
        "environment": {"platform": "x", "device": "cpu", "accelerator": "none", "blas": "openblas", "versions": {}},
        "started_at": "2026-01-01T00:00:00+00:00",
        "wall_seconds": 1.0,
    }
    contracts.write_json(stages.get("train").manifest_path("main"), manifest, "run_manifest")
    assert stages.read_manifest("train", "main")["stage"] == "train"
    assert stages.stale_outputs("train", "main") == []
    (folder / "adapters.safetensors").write_bytes(b"other weights")
    with pytest.raises(PipelineError, match=r"runs/main/adapter: the adapter has changed since `make train EXP=main`"):
        stages.read_manifest("train", "main")
    assert stages.stale_outputs("train", "main") == ["runs/main/adapter is changed"]
    (folder / "adapters.safetensors").unlink()
    folder.rmdir()
    assert stages.stale_outputs("train", "main") == ["runs/main/adapter is missing"]
    with pytest.raises(
        PipelineError, match=r"runs/main/adapter: the adapter that `make train EXP=main` made is missing"
    ):
        stages.read_manifest("train", "main")
