"""The stage registry: the Makefile, the config and the code agree with it, and upstream reads say what to run."""

from __future__ import annotations

import re
import shutil

from pipeline import contracts, hashing, paths, stages
from pipeline.errors import PipelineError
from pipeline.manifest import file_entry

import datasets
import pytest
import yaml

import model as model_stage
import prepare
from fixtures import datasets as fx
from helpers import REPO
from prepare import sources as prepare_sources


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
    assert {"quantize/__init__.py", "lm/hf_to_gguf.py", "lm/gguf_mapping.py", "lm/chat_template.py"} <= quantize
    assert "lm/ollama.py" not in quantize  # packaging comes after eval
    package = {p.relative_to(paths.SCRIPTS_DIR).as_posix() for p in stages.code_files("package")}
    assert {"package.py", "lm/ollama.py", "lm/gotemplate.py", "lm/docker.py"} <= package
    model = {p.relative_to(paths.SCRIPTS_DIR).as_posix() for p in stages.code_files("model")}
    assert "lm/gguf_to_hf.py" in model and "lm/llama_runner.py" not in model and "lm/tokens.py" not in model


def test_makefile_targets_are_the_registry_manifests():
    makefile = (REPO / "Makefile").read_text()
    for name in stages.PIPELINE:
        stage = stages.get(name)
        assert re.search(rf"^{name}: \$\({name}_TARGETS\)$", makefile, re.M), name
        if stage.per_experiment:
            rule = rf"{re.escape(stage.manifest.format(experiment='%'))}: \$\$\({name}_DEPS_\$\$\*\)"
            recipe = f"$(RUN_STAGE) {name} experiment.name=$* $(STAGE_ARGS)"
        else:  # the workspace's own, and a pattern rule for each variant
            own = re.escape(stage.manifest_for(None))
            rule, recipe = rf"{own}: \$\({name}_DEPS\)", f"$(RUN_STAGE) {name} $(STAGE_ARGS)"
            if name in ("model", "prepare"):
                variant = re.escape(stage.manifest_for(None, "%", "%"))
                assert re.search(rf"^{variant}: \$\$\({name}_DEPS_\$\$\*\) \| \$\(SETUP_STAMP\)$", makefile, re.M)
                assert f"experiment.name=$({name}_OWNER_$*)" in makefile
        after = r" \$\$\(AFTER_\$\$\*\)" if stage.per_experiment else ""  # a search trial's stages wait for it
        assert re.search(rf"^{rule} \| \$\(SETUP_STAMP\){after}$", makefile, re.M), name
        assert recipe in makefile, name
    assert re.search(r"^all: " + " ".join(stages.PIPELINE) + "$", makefile, re.M)


def test_every_config_section_is_read_by_exactly_one_stage():
    sections = set(yaml.safe_load((REPO / "config" / "default.yaml").read_text())) - {"experiment"}
    claimed = [s for stage in stages.STAGES.values() for s in stage.sections]
    claimed.remove("sweep")  # the search reads sweep.search, the summary what the whole sweep varies
    assert sorted(claimed) == sorted(sections)


def test_experiment_sections_are_those_of_the_per_experiment_stages():
    assert stages.experiment_sections() == {"train", "distributed", "fuse", "quantize", "eval", "package", "freeze"}


def test_make_include_lists_code_slices_and_upstream_manifests(project):
    include = stages.make_include(["exp1", "exp2"], ["exp2"])
    deps = dict(line.split(" := ", 1) for line in include.splitlines() if " := " in line)
    assert "scripts/lm/hf_to_gguf.py" in deps["quantize_DEPS_exp1"].split()
    assert "runs/exp1/.config/quantize.json" in deps["quantize_DEPS_exp1"].split()
    assert "runs/exp1/fuse.manifest.json" in deps["quantize_DEPS_exp1"].split()
    assert "runs/exp2/fuse.manifest.json" in deps["quantize_DEPS_exp2"].split()
    assert deps["quantize_TARGETS"] == "runs/exp2/quantize.manifest.json"  # the selected experiment's
    assert deps["EXPERIMENTS"] == "exp1 exp2" and deps["prepare_TARGETS"] == "data/prepare.manifest.json"
    assert ".state/config/prepare.json" in deps["prepare_DEPS"].split()
    assert "$(wildcard config/templates/*.jinja)" in deps["prepare_DEPS"]
    assert "scripts/lm/ollama.py" not in deps["eval_DEPS_exp1"].split()


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


# --- data sources: editing the dataset re-runs prepare ---------------------------------------------


def write_lines(path, count: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f'{{"prompt": "question {i}?", "completion": "answer {i}."}}\n' for i in range(count)))


def edit_in_place(path, old: str, new: str) -> None:
    """Replace text in a file, same path (same inode) and, as `new` is as long as `old`, same size."""
    assert len(old) == len(new)
    size = path.stat().st_size
    path.write_text(path.read_text().replace(old, new, 1))
    assert path.stat().st_size == size


def test_a_folder_fingerprint_names_each_file_added_removed_or_edited(tmp_path, monkeypatch):
    folder = tmp_path / "src"
    for name in ("a.jsonl", "b.jsonl", "nested/c.jsonl"):
        write_lines(folder / name)
    cache = hashing.Sha256Cache(tmp_path / "cache.json")
    first = hashing.fingerprint(folder, cache.sized, "data/src")
    assert first["sha256"] == hashing.sha256_tree(folder)  # what prepare has always recorded for a folder
    assert [f["path"] for f in first["files"]] == ["data/src/a.jsonl", "data/src/b.jsonl", "data/src/nested/c.jsonl"]
    assert first["bytes"] == sum(f["bytes"] for f in first["files"])

    reads = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda path: reads.append(path) or real(path))
    assert hashing.fingerprint(folder, cache.sized, "data/src") == first
    assert reads == []  # unchanged size and mtime: no file is read again
    assert hashing.changed_files(first["files"], first["files"]) == []

    edit_in_place(folder / "nested" / "c.jsonl", "answer 3", "answer 9")
    (folder / "a.jsonl").unlink()
    write_lines(folder / "d.jsonl")
    now = hashing.fingerprint(folder, cache.sized, "data/src")
    assert reads == [folder / "d.jsonl", folder / "nested" / "c.jsonl"]  # only the new and the edited file
    assert now["sha256"] != first["sha256"] and now["sha256"] == hashing.sha256_tree(folder)
    assert hashing.changed_files(first["files"], now["files"]) == [
        "data/src/a.jsonl was removed",
        "data/src/d.jsonl was added",
        "data/src/nested/c.jsonl is changed",
    ]


def prepare_manifest(inputs: list[dict]) -> dict:
    return {
        "stage": "prepare",
        "experiment": None,
        "config": {},
        "inputs": inputs,
        "details": {},
        "outputs": [file_entry("data_contract", paths.DATA_CONTRACT)],
        "environment": {"platform": "x", "device": "cpu", "accelerator": "none", "blas": "openblas", "versions": {}},
        "started_at": "2026-01-01T00:00:00+00:00",
        "wall_seconds": 1.0,
    }


def data_contract(sources: list[dict]) -> dict:
    return {
        "format": "completions",
        "record_schema": {},
        "field_map": {},
        "template": {"id": "chatml", "origin": "builtin", "source": "{{ x }}", "sha256": "0" * 64},
        "max_seq_length": 64,
        "sources": sources,
        "splits": {name: f"data/{name}.jsonl" for name in paths.SPLITS},
        "tool_schemas": None,
        "tokenizer": {"model": "tiny", "sha256": "0" * 64},
        "config": {"data": {}, "prepare": {}},
    }


def record_prepare(sources: list[str], with_files: bool) -> None:
    """A prepare manifest and data contract recording `sources` as prepare does (prepare.sources.fingerprint)."""
    entries = []
    for source in sources:
        if source.startswith("builtin:"):
            entries.append({"path": source, "sha256": hashing.sha256_json(source), "bytes": 1})
        elif source.startswith("hub:"):
            entries.append({"path": source, "sha256": hashing.sha256_json({"hub": source}), "bytes": 0})
        else:
            entries.append(prepare_sources.fingerprint(paths.resolve(source)))
    contract_sources = [
        {"source": e["path"], "format": "completions", "records": 6, **e}
        if with_files and "files" in e
        else {"source": e["path"], "path": e["path"], "sha256": e["sha256"], "bytes": e["bytes"]}
        | {"format": "completions", "records": 6}
        for e in entries
    ]
    contracts.write_json(paths.DATA_CONTRACT, data_contract(contract_sources), "data_contract")
    inputs = [{"role": "source", "path": e["path"], "sha256": e["sha256"], "bytes": e["bytes"]} for e in entries]
    contracts.write_json(paths.PREPARE_MANIFEST, prepare_manifest(inputs), "run_manifest")


def save_hf_dataset(folder, answers: list[str]) -> None:
    rows = [{"prompt": f"question {i}?", "completion": a} for i, a in enumerate(answers)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))


SOURCES = ["mydata/one.jsonl", "mydata/two.csv", "mydata/folder", "mydata/hf", "builtin:tool-calls", "hub:org/set"]


@pytest.fixture
def recorded_sources(project):
    """Every kind of source on disk in the project, recorded by a prepare manifest (no files in the contract)."""
    data = project / "mydata"
    write_lines(data / "one.jsonl")
    (data / "two.csv").write_text("prompt,completion\nquestion 1?,answer 1.\n")
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        write_lines(data / "folder" / name)
    save_hf_dataset(data / "hf", ["answer 0.", "answer 1."])
    return data


def test_an_edited_file_source_is_stale_until_its_content_is_back(recorded_sources):
    record_prepare(SOURCES, with_files=False)
    assert stages.stale_sources(SOURCES) == []
    edit_in_place(recorded_sources / "one.jsonl", "answer 2.", "answer 7.")
    assert stages.stale_sources(SOURCES) == ["mydata/one.jsonl is changed"]
    edit_in_place(recorded_sources / "one.jsonl", "answer 7.", "answer 2.")  # a new mtime, the same content
    assert stages.stale_sources(SOURCES) == []
    edit_in_place(recorded_sources / "two.csv", "answer 1", "answer 4")
    (recorded_sources / "folder" / "extra.md").write_text("# notes\n")
    save_hf_dataset(recorded_sources / "hf", ["answer 0.", "answer 5."])
    assert stages.stale_sources(SOURCES) == [
        "mydata/two.csv is changed",
        "mydata/folder is changed",
        "mydata/hf is changed",
    ]
    # a source no longer configured is not checked: the data slice changed, which re-runs prepare anyway
    assert stages.stale_sources(["mydata/one.jsonl", "./mydata/two.csv"]) == ["mydata/two.csv is changed"]


def test_a_folder_source_names_the_files_that_changed(recorded_sources):
    record_prepare(SOURCES, with_files=True)
    assert contracts.read_json(paths.DATA_CONTRACT, "data_contract")["sources"][2]["files"][0] == {
        "path": "mydata/folder/test.jsonl",
        "bytes": (recorded_sources / "folder" / "test.jsonl").stat().st_size,
        "sha256": hashing.sha256_file(recorded_sources / "folder" / "test.jsonl"),
    }
    assert stages.stale_sources(SOURCES) == []
    edit_in_place(recorded_sources / "folder" / "valid.jsonl", "question 0", "question 8")
    (recorded_sources / "folder" / "test.jsonl").unlink()
    write_lines(recorded_sources / "folder" / "more" / "train.jsonl")
    assert stages.stale_sources(SOURCES) == [
        "mydata/folder/more/train.jsonl was added",
        "mydata/folder/test.jsonl was removed",
        "mydata/folder/valid.jsonl is changed",
    ]
    save_hf_dataset(recorded_sources / "hf", ["answer 0.", "answer 5."])  # a saved dataset is a folder too
    hf = [line for line in stages.stale_sources(SOURCES) if line.startswith("mydata/hf/")]
    assert "mydata/hf/train/data-00000-of-00001.arrow is changed" in hf


def test_a_changed_or_missing_source_forces_prepare_in_the_make_include(recorded_sources):
    record_prepare(SOURCES, with_files=False)
    assert stages.stale_stages("main", SOURCES) == {}
    (recorded_sources / "one.jsonl").unlink()  # prepare itself says what is wrong when it runs
    stale = stages.stale_stages("main", SOURCES)
    assert stale == {"prepare": ["the data it read has changed since: mydata/one.jsonl is missing"]}
    include = stages.make_include(["main"], stale={"main": stale})
    deps = dict(line.split(" := ", 1) for line in include.splitlines() if " := " in line)
    assert deps["prepare_DEPS"].split()[-1] == "FORCE"
    assert "FORCE" not in deps["train_DEPS_main"]  # train re-runs because prepare's manifest is rewritten
    paths.PREPARE_MANIFEST.write_text("{broken")  # reported by stale_outputs, not a crash here
    assert stages.stale_sources(SOURCES) == []


@pytest.mark.parametrize("names", [["messages.jsonl", "sharegpt.jsonl"], ["given_splits"], ["hf_saved"]])
def test_what_prepare_records_is_what_make_compares(project, tiny_model_dir, names, tmp_path):
    """Several files, a folder, a saved HF dataset: prepare's records match the check until a file changes."""
    written = fx.write_all(tmp_path / "datasets")
    (project / "mydata").mkdir()
    for name in names:
        (shutil.copytree if written[name].is_dir() else shutil.copy2)(written[name], project / "mydata" / name)
    sources = [f"mydata/{name}" for name in names]
    assert model_stage.main([f"model.source={tiny_model_dir}"]) == 0
    assert prepare.main([f"data.source=[{','.join(sources)}]"]) == 0
    assert stages.stale_sources(sources) == []
    last = project / sources[-1]
    if last.is_dir():
        last = sorted(p for p in last.rglob("*") if p.is_file())[-1]
    with open(last, "ab") as f:
        f.write(b" ")
    found = stages.stale_sources(sources)
    assert found and all(line.startswith(sources[-1]) for line in found), found
