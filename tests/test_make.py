"""The Makefile: help by default, dry runs, real file targets, and re-running only what changed."""

from __future__ import annotations

import json
import os
import shutil
import time

from pipeline.hashing import sha256_file

from fixtures import datasets as fx
from helpers import make, write_override

# The Make tests are about what re-runs, not about the stages' work: every stage runs, briefly.
BRIEF = """
train: {iters: 4, steps_per_eval: 2, val_batches: 1, num_layers: 2}
quantize: {mlx: [], gguf_types: [], check_prompts: 1, check_max_tokens: 8, perplexity_records: 2}
package: {docker: {enabled: false}}
eval: {records: 4, max_tokens: 8}
"""


def use_tiny_model(project, tiny_model_dir):
    write_override(project, f"model:\n  source: {tiny_model_dir}\n{BRIEF}")


def test_help_is_the_default_goal_and_lists_the_stages(project):
    out = make(project).stdout
    for target in ("setup", "doctor", "all", "model", "prepare", "test", "clean"):
        assert f"  {target} " in out, out


def test_dry_run_of_all(project, tiny_model_dir):
    use_tiny_model(project, tiny_model_dir)
    out = make(project, "-n", "all").stdout
    assert "-m model" in out and "-m prepare" in out
    assert not (project / "runs" / "model.manifest.json").exists()


def test_second_make_all_does_nothing(project, tiny_model_dir):
    use_tiny_model(project, tiny_model_dir)
    make(project, "all")
    stamps = mtimes(project)
    again = make(project, "all")
    assert "Nothing to be done for 'all'" in again.stdout
    assert make(project, "-q", "all", check=False).returncode == 0
    assert mtimes(project) == stamps


def mtimes(project) -> dict[str, int]:
    return {
        stage: (project / path).stat().st_mtime_ns
        for stage, path in (("model", "runs/model.manifest.json"), ("prepare", "data/prepare.manifest.json"))
    }


def test_changing_a_key_reruns_only_the_stages_that_read_it(project, tiny_model_dir):
    use_tiny_model(project, tiny_model_dir)
    make(project, "all")
    first = mtimes(project)
    make(project, "all", "SET=doctor.matmul_size=256")  # a section no stage of `all` reads
    assert mtimes(project) == first
    out = make(project, "all", "SET=prepare.contamination_ngram=5")  # prepare's own slice
    assert "-m prepare" in out.stdout and "-m model" not in out.stdout
    second = mtimes(project)
    assert second["model"] == first["model"] and second["prepare"] != first["prepare"]
    assert make(project, "-q", "all", "SET=prepare.contamination_ngram=5", check=False).returncode == 0
    assert make(project, "-q", "all", "SET=model.dtype=float16", check=False).returncode != 0
    out = make(project, "all", "SET=model.dtype=float16")  # the model changes, so prepare (its tokenizer) re-runs too
    third = mtimes(project)
    assert "-m model" in out.stdout and "-m prepare" in out.stdout
    assert third["model"] != second["model"] and third["prepare"] != second["prepare"]


def test_misspelt_override_key_stops_make_with_a_suggestion(project, tiny_model_dir):
    write_override(project, "model:\n  sorce: x\n")
    result = make(project, "all", check=False)
    assert result.returncode != 0
    assert "unknown key 'model.sorce'" in result.stderr and "did you mean 'model.source'?" in result.stderr
    assert not (project / "runs" / "model.manifest.json").exists()


def test_missing_override_file_named_on_the_command_line(project):
    result = make(project, "all", "OVERRIDE=config/nope.yaml", check=False)
    assert result.returncode != 0
    assert "override file config/nope.yaml does not exist" in result.stderr


MANIFESTS = {
    "model": "runs/model.manifest.json",
    "prepare": "data/prepare.manifest.json",
    "train": "runs/main/train.manifest.json",
    "fuse": "runs/main/fuse.manifest.json",
    "quantize": "runs/main/quantize.manifest.json",
    "eval": "eval_out/main/eval.manifest.json",
}


def stage_mtimes(project) -> dict[str, int]:
    return {stage: (project / path).stat().st_mtime_ns for stage, path in MANIFESTS.items()}


def rerun_after_editing(project, source: str) -> set[str]:
    """Touch one code file as an edit would, run `make all`, return the stages that ran again."""
    before = stage_mtimes(project)
    # now, not later: every manifest was written before this, and the stages re-run write theirs after it
    # (a time in the future could still be ahead of a fast stage's new manifest, and run it once more)
    now = time.time()
    os.utime(project / source, (now, now))
    make(project, "all")
    after = stage_mtimes(project)
    return {stage for stage in MANIFESTS if after[stage] != before[stage]}


def test_editing_code_reruns_exactly_the_stages_that_use_it(project, tiny_model_dir):
    use_tiny_model(project, tiny_model_dir)
    make(project, "all")
    # a shared module that quantize and eval import (and no earlier stage)
    assert rerun_after_editing(project, "scripts/lm/llama_runner.py") == {"quantize", "eval"}
    # a module of one stage only
    assert rerun_after_editing(project, "scripts/eval/report.py") == {"eval"}
    # the GGUF reader the model stage converts with: everything after it runs again
    assert rerun_after_editing(project, "scripts/lm/gguf_to_hf.py") == set(MANIFESTS)


def test_a_deleted_or_changed_output_makes_its_stage_run_again(finished, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(finished, root, symlinks=True)
    adapter = root / "runs" / "main" / "adapter" / "adapters.safetensors"
    trained = adapter.read_bytes()
    shutil.rmtree(adapter.parent)
    out = make(root, "fuse")
    assert "train: runs again" in out.stderr and "runs/main/adapter is missing" in out.stderr
    assert "-m train" in out.stdout and "-m fuse" in out.stdout
    assert adapter.read_bytes() == trained  # same seed, same bytes
    (root / "data" / "test.jsonl").write_text("")
    out = make(root, "prepare")
    assert "prepare: runs again" in out.stderr and "data/test.jsonl is changed" in out.stderr
    assert "Nothing to be done" in make(root, "prepare").stdout


def use_dataset(project, tiny_model_dir, records: int = 40):
    """data.source: one JSONL file of completions records in the project, and the tiny model."""
    fx.write_jsonl(project / "mydata" / "qa.jsonl", [{"prompt": q, "completion": a} for q, a in fx.qa_pairs(records)])
    write_override(project, f"model:\n  source: {tiny_model_dir}\ndata:\n  source: [mydata/qa.jsonl]\n{BRIEF}")
    return project / "mydata" / "qa.jsonl"


def prepared_text(project) -> str:
    return "".join((project / "data" / f"{split}.jsonl").read_text() for split in ("train", "valid", "test"))


def test_editing_the_dataset_in_place_reruns_prepare_and_what_follows(project, tiny_model_dir):
    dataset = use_dataset(project, tiny_model_dir)
    make(project, "all")
    before = stage_mtimes(project)
    assert "tip number 7 is to ask a local." in prepared_text(project)
    size = dataset.stat().st_size
    dataset.write_text(
        dataset.read_text().replace("tip number 7 is to ask a local.", "tip number 7 is to ask a guide.")
    )
    assert dataset.stat().st_size == size  # same path, same size: only the content tells

    out = make(project, "all")
    assert "prepare: runs again, the data it read has changed since: mydata/qa.jsonl is changed" in out.stderr
    after = stage_mtimes(project)
    assert {stage for stage in MANIFESTS if after[stage] != before[stage]} == set(MANIFESTS) - {"model"}
    text = prepared_text(project)
    assert "tip number 7 is to ask a guide." in text and "tip number 7 is to ask a local." not in text
    recorded = json.loads((project / MANIFESTS["prepare"]).read_text())["inputs"]
    assert {"role": "source", "path": "mydata/qa.jsonl", "sha256": sha256_file(dataset), "bytes": size} in recorded

    again = make(project, "all")
    assert "Nothing to be done for 'all'" in again.stdout and "runs again" not in again.stderr
    assert make(project, "-q", "all", check=False).returncode == 0
    assert stage_mtimes(project) == after


def test_a_dataset_that_disappeared_is_reported_by_prepare(project, tiny_model_dir):
    dataset = use_dataset(project, tiny_model_dir)
    make(project, "prepare")
    dataset.unlink()
    out = make(project, "prepare", check=False)
    assert out.returncode != 0
    assert "prepare: runs again, the data it read has changed since: mydata/qa.jsonl is missing" in out.stderr
    assert "error: mydata/qa.jsonl: data file not found" in out.stderr and "Traceback" not in out.stderr
