"""Several experiments in one workspace through Make: a sweep runs every experiment once and then
nothing, a changed experiment re-runs alone, a failing one does not stop the others, and the summary
compares them (runs/experiments.csv, eval_out/summary.md), with the mean ± sd over seeds."""

from __future__ import annotations

import csv
import re

from pipeline import contracts
from pipeline.config import load_workspace
from pipeline.errors import ConfigError
from pipeline.hashing import sha256_file

import pandas
import pytest

from fixtures.tiny_model import UPPERCASE_TEMPLATE, build_tiny_model
from helpers import make, write_override
from test_make import BRIEF, mtimes

SWEEP = """
experiments:
  - name: a
  - name: b
    train: {lora: {rank: 4}}
sweep:
  train.learning_rate: [1.0e-3, 5.0e-3]
"""
NAMES = ["a-lr1e-3", "a-lr5e-3", "b-lr1e-3", "b-lr5e-3"]


def rows(project) -> dict[str, dict]:
    with open(project / "runs" / "experiments.csv", newline="") as f:
        return {r["experiment"]: r for r in csv.DictReader(f)}


def manifests(project, name: str) -> dict[str, float]:
    """The mtime of each stage manifest of one experiment."""
    found = {}
    for stage, folder in (("train", "runs"), ("fuse", "runs"), ("quantize", "runs"), ("eval", "eval_out")):
        path = project / folder / name / f"{stage}.manifest.json"
        found[stage] = path.stat().st_mtime_ns if path.exists() else None
    return found


def test_a_sweep_runs_each_experiment_once_and_a_change_reruns_only_it(project, tiny_model_dir):
    write_override(project, f"model:\n  source: {tiny_model_dir}\n{BRIEF}{SWEEP}")
    listing = make(project, "experiments").stdout
    assert "4 experiments:" in listing and "b-lr5e-3" in listing and "train.lora.rank=4" in listing
    first = make(project, "all")
    base_lines = re.findall(r"\] base: loss .*", first.stderr)
    assert len(base_lines) == 4 and sum("(cached" in line for line in base_lines) == 3  # the base is scored once
    table = rows(project)
    assert list(table) == NAMES and all(r["status"] == "ok" for r in table.values())
    assert len({r["adapter_sha256"] for r in table.values()}) == 4
    assert table["b-lr1e-3"]["train.lora.rank"] == "4" and table["a-lr1e-3"]["train.lora.rank"] == "8"
    assert table["a-lr5e-3"]["train.learning_rate"] == "0.005"
    for row in table.values():
        contracts.validate(_typed(row), "experiment_row", where="experiments.csv")
    frame = pandas.read_csv(project / "runs" / "experiments.csv")  # what a notebook or a spreadsheet reads
    assert list(frame["experiment"]) == NAMES and frame["train.lora.rank"].tolist() == [8, 8, 4, 4]
    summary = (project / "eval_out" / "summary.md").read_text()
    assert re.search(r"^\*\*Best: `[ab]-lr\de-3`\*\*", summary, re.M) and summary.count("| ok (") == 4
    charts = re.findall(r"!\[[^]]*\]\(summary/([^)]+\.png)\)", summary)
    assert len(charts) == 2 and all((project / "eval_out" / "summary" / c).is_file() for c in charts)
    html = (project / "eval_out" / "summary.html").read_text()
    assert "<table>" in html and html.count("data:image/png;base64,") == 2 and 'src="summary/' not in html

    stamps = mtimes(project)
    again = make(project, "all")
    assert "Nothing to be done for 'all'" in again.stdout and mtimes(project) == stamps

    before = {name: manifests(project, name) for name in NAMES}
    write_override(project, f"model:\n  source: {tiny_model_dir}\n{BRIEF}{SWEEP.replace('rank: 4', 'rank: 2')}")
    make(project, "all")
    after = {name: manifests(project, name) for name in NAMES}
    for name in NAMES:
        changed = {stage for stage in before[name] if after[name][stage] != before[name][stage]}
        assert changed == ({"train", "fuse", "quantize", "eval"} if name.startswith("b") else set()), name
    assert rows(project)["b-lr1e-3"]["train.lora.rank"] == "2"


def test_a_failing_experiment_does_not_stop_the_others(project, tiny_model_dir):
    # b's batch is larger than the training split: train refuses it; a and c complete
    write_override(
        project,
        f"model:\n  source: {tiny_model_dir}\n{BRIEF}"
        "experiments:\n  - name: a\n  - name: b\n    train: {batch_size: 5000}\n  - name: c\n",
    )
    result = make(project, "all", check=False)
    assert result.returncode != 0
    assert re.search(r"1 of 3 experiments did not complete: b \(train: .*batch", result.stderr), result.stderr
    table = rows(project)
    assert [table[n]["status"] for n in "abc"] == ["ok", "failed", "ok"]
    assert table["b"]["failed_stage"] == "train" and "batch" in table["b"]["reason"]
    assert "skipped: train failed" in result.stderr  # b's later stages do not pile up errors of their own
    assert (project / "eval_out" / "a" / "eval.manifest.json").is_file()
    assert not (project / "eval_out" / "b" / "eval.manifest.json").exists()


def test_seeds_give_mean_and_sd_in_the_summary(project, tiny_model_dir):
    write_override(project, f"model:\n  source: {tiny_model_dir}\n{BRIEF}sweep:\n  seeds: [0, 1]\n")
    make(project, "all")
    table = rows(project)
    assert list(table) == ["s0", "s1"] and [table[n]["seed"] for n in table] == ["0", "1"]
    values = [float(table[n]["fused_task"]) for n in table]
    mean, sd = sum(values) / 2, abs(values[0] - values[1]) / 2**0.5
    summary = (project / "eval_out" / "summary.md").read_text()
    assert "## Over seeds" in summary
    digits = 3 if table["s0"]["task_metric"] in ("loss", "perplexity") else 1
    assert f"{mean:.{digits}f} ± {sd:.{digits}f}" in summary, summary


def _typed(row: dict) -> dict:
    """A CSV row back to the types the schema checks (numbers, nulls)."""
    out = {}
    for key, value in row.items():
        if value == "":
            out[key] = None
            continue
        try:
            number = float(value)
            out[key] = int(number) if number.is_integer() and "." not in value and "e" not in value else number
        except ValueError:
            out[key] = value
    return out


def test_two_base_models_each_prepare_their_data_once_even_with_j2(project, tiny_model_dir, tmp_path_factory):
    other_model = build_tiny_model(tmp_path_factory.mktemp("tiny-upper"), seed=1, chat_template=UPPERCASE_TEMPLATE)
    write_override(
        project,
        BRIEF.replace("docker: {enabled: false}", "docker: {enabled: false}, ollama: {enabled: false}")
        + f"experiments:\n  - name: a\n    model: {{source: {tiny_model_dir}}}\n"
        f"  - name: a-r2\n    model: {{source: {tiny_model_dir}}}\n    train: {{lora: {{rank: 2}}}}\n"
        f"  - name: upper\n    model: {{source: {other_model}}}\n",
    )
    result = make(project, "-j2", "all")  # two models converted and two datasets prepared side by side
    assert result.stderr.count("[prepare] resolved config") == 2  # once per model, not per experiment
    assert result.stderr.count("[model] resolved config") == 2
    own, upper = tiny_model_dir.name, other_model.name
    data = {name: project / "data" / name for name in (own, upper)}
    assert all((folder / "prepare.manifest.json").is_file() for folder in data.values())
    assert not (project / "data" / "prepare.manifest.json").exists()  # no experiment uses the default model
    contracts_ = {n: contracts.read_json(f / "data_contract.json", "data_contract") for n, f in data.items()}
    assert contracts_[own]["template"]["sha256"] != contracts_[upper]["template"]["sha256"]
    for experiment, model in (("a", own), ("a-r2", own), ("upper", upper)):
        manifest = contracts.read_json(project / "runs" / experiment / "train.manifest.json", "run_manifest")
        used = next(i for i in manifest["inputs"] if i["role"] == "data_contract")
        assert used["path"] == f"data/{model}/data_contract.json"
        assert used["sha256"] == sha256_file(data[model] / "data_contract.json")
    table = rows(project)
    assert [table[n]["status"] for n in ("a", "a-r2", "upper")] == ["ok"] * 3
    assert table["upper"]["model.source"] == str(other_model)
    summary = (project / "eval_out" / "summary.md").read_text()
    assert all(f"| {n} |" in summary for n in ("a", "a-r2", "upper"))
    assert "Nothing to be done for 'all'" in make(project, "all").stdout


def test_an_experiment_continues_from_another_ones_adapter(project, tiny_model_dir):
    def configure(a_learning_rate: str) -> None:
        write_override(
            project,
            f"model:\n  source: {tiny_model_dir}\n{BRIEF}"
            f"experiments:\n  - name: a\n    train: {{learning_rate: {a_learning_rate}}}\n"
            "  - name: b\n    train: {init_from: a, iters: 2}\n",
        )

    configure("5.0e-3")
    make(project, "all")
    a, b = (contracts.read_json(project / "runs" / n / "train.manifest.json", "run_manifest") for n in "ab")
    assert abs(b["details"]["first_val_loss"] - a["details"]["final_val_loss"]) < 1e-4
    assert a["details"]["first_val_loss"] - b["details"]["first_val_loss"] > 1e-3  # b did not start from the base
    started = next(i for i in b["inputs"] if i["role"] == "start_adapter")
    assert started["path"] == "runs/a/adapter" and started["sha256"] == next(
        o["sha256"] for o in a["outputs"] if o["role"] == "adapter"
    )
    assert rows(project)["b"]["init_from"] == "a"
    b_trained = (project / "runs" / "b" / "train.manifest.json").stat().st_mtime_ns
    configure("1.0e-3")  # a changes: b, which starts from a's adapter, trains again
    make(project, "all")
    assert (project / "runs" / "b" / "train.manifest.json").stat().st_mtime_ns != b_trained


def test_init_from_must_name_another_experiment_without_a_cycle(project):
    for text, pattern in (
        ("experiments:\n  - name: a\n    train: {init_from: z}\n", r"starts from 'z'.*not configured"),
        (
            "experiments:\n  - name: a\n    train: {init_from: b}\n  - name: b\n    train: {init_from: a}\n",
            r"goes round in a circle: a -> b -> a",
        ),
    ):
        write_override(project, text)
        with pytest.raises(ConfigError, match=pattern):
            load_workspace()
