"""The Makefile: help by default, dry runs, real file targets, and re-running only what changed."""

from __future__ import annotations

from helpers import make, write_override


# The Make tests are about what re-runs, not about the stages' work: every stage runs, briefly.
BRIEF = """
train: {iters: 4, steps_per_eval: 2, val_batches: 1, num_layers: 2}
quantize: {mlx: [], gguf_types: [], check_prompts: 1, check_max_tokens: 8, perplexity_records: 2, docker: {enabled: false}}
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
    return {stage: (project / path).stat().st_mtime_ns for stage, path in (("model", "runs/model.manifest.json"), ("prepare", "data/prepare.manifest.json"))}


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
