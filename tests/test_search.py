"""The hyperparameter search (sweep.search): an Optuna study in runs/search.db whose trials are ordinary
experiments; an interrupted search resumes to exactly its budget; a wrong search is one line."""

from __future__ import annotations

import csv
import os
import re
import signal
import sqlite3
import subprocess
import time

from pipeline import contracts, study
from pipeline.config import load_workspace
from pipeline.errors import ConfigError

import optuna
import pytest

from helpers import make, write_override
from test_make import BRIEF

SEARCH = """
sweep:
  search:
    trials: 3
    seed: 7
    space:
      train.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}
      train.lora.rank: {choices: [2, 4]}
"""


def study_trials(project) -> list:
    names = optuna.get_all_study_names(f"sqlite:///{project / 'runs' / 'search.db'}")
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=f"sqlite:///{project / 'runs' / 'search.db'}").trials


def trial_states(project) -> list[str]:
    """The study's trial states by number, read with sqlite3 so a test never holds Optuna's connection."""
    db = project / "runs" / "search.db"
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return [row[0] for row in conn.execute("select state from trials order by number")]
    except sqlite3.OperationalError:  # the tables are not created yet, or a write holds the lock
        return []


def chosen_settings(project, number: int) -> int:
    """How many settings the study has chosen for trial `number` (read as trial_states reads)."""
    db = project / "runs" / "search.db"
    query = "select count(*) from trial_params p join trials t on p.trial_id = t.trial_id where t.number = ?"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute(query, (number,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def make_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    env.pop("PIPELINE_ROOT", None)
    return env


@pytest.mark.slow
def test_an_interrupted_search_resumes_to_exactly_its_budget(project, tiny_model_dir):
    write_override(project, f"model:\n  source: {tiny_model_dir}\n{BRIEF}{SEARCH}")
    listing = make(project, "experiments").stdout
    assert "0 experiments" in listing and "search: study search-" in listing and "0 of 3 trials" in listing

    first = subprocess.Popen(
        ["make", "--no-print-directory", "all"],
        cwd=project,
        env=make_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches make, the driver and the trial
    )
    deadline = time.monotonic() + 600
    # Killed inside the second trial, once its settings are chosen (between optuna's ask and the last
    # suggest the trial is running but has no experiment yet: the search marks such a trial failed).
    while trial_states(project) != ["COMPLETE", "RUNNING"] or chosen_settings(project, 1) < 2:
        assert first.poll() is None, f"make all ended first; the study holds {trial_states(project)}"
        assert time.monotonic() < deadline, f"the second trial did not start in 10 minutes: {trial_states(project)}"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()

    resumed = make(project, "all")
    assert re.search(r"\[search\] trial 1 \(\S+\) was interrupted; running it again", resumed.stderr)
    trials = study_trials(project)
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    with open(project / "runs" / "experiments.csv", newline="") as f:
        table = list(csv.DictReader(f))
    workspace = load_workspace()
    assert [r["experiment"] for r in table] == workspace.names() and len(table) == 3
    assert all(r["status"] == "ok" for r in table)
    for row, trial in zip(table, trials):
        assert float(row["best_val_loss"]) == pytest.approx(trial.value)
        assert int(row["train.lora.rank"]) == trial.params["train.lora.rank"]
        assert float(row["train.learning_rate"]) == float(f"{trial.params['train.learning_rate']:.3g}")
    record = contracts.read_json(project / "runs" / "search.json", "search")
    assert [t["experiment"] for t in record["trials"]] == workspace.names()
    summary = (project / "eval_out" / "summary.md").read_text()
    best = min(trials, key=lambda t: t.value)
    assert f"(study {record['study']}): 3 of 3 trials" in summary and workspace.names()[best.number] in summary

    again = make(project, "all")
    assert "Nothing to be done for 'all'" in again.stdout and len(study_trials(project)) == 3


def test_the_search_samples_the_same_trials_whether_or_not_it_was_interrupted(tmp_path):
    """The sampler is seeded by the trial's number: the first trials of a fresh study are the same as
    those of one re-opened after each trial (what a resumed search does)."""
    space = {"train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True, "step": None, "integer": False}}
    search = study.Search(3, "val_loss", 7, space | {"train.lora.rank": {"choices": [2, 4, 8]}}, "search-00000000")

    def sampled(reopen: bool) -> list[dict]:
        storage = f"sqlite:///{tmp_path / ('a' if reopen else 'b')}.db"
        current = optuna.create_study(study_name=search.study_name, storage=storage)
        found = []
        for number in range(4):
            if reopen:
                current = optuna.load_study(study_name=search.study_name, storage=storage)
            current.sampler = optuna.samplers.TPESampler(seed=search.seed * 1_000_003 + number)
            trial = current.ask()
            found.append(study.suggest(trial, search))
            current.tell(trial, found[-1]["train.learning_rate"])
        return found

    first, resumed = sampled(False), sampled(True)
    assert first == resumed and len({str(s) for s in first}) == 4


@pytest.mark.parametrize(
    "sweep, expected",
    [
        (
            "search: {trials: 2, space: {train.lora.rnak: {choices: [2, 4]}}}",
            "sweep.search.space.train.lora.rnak: unknown key 'train.lora.rnak' -- fix: did you mean 'train.lora.rank'?",
        ),
        (
            "search: {trials: 2, space: {train.learning_rate: {low: 1.0e-2, high: 1.0e-4}}}",
            "sweep.search.space.train.learning_rate: 'train.learning_rate': low (0.01) must be below high (0.0001)",
        ),
        ("search: {trials: 0, space: {train.lora.rank: {choices: [2]}}}", "'sweep.search.trials' must be a positive"),
        (
            "search: {trials: 2, metric: test_loss, space: {train.lora.rank: {choices: [2]}}}",
            "'sweep.search.metric' must be one of val_loss, got 'test_loss'",
        ),
        (
            "search: {trials: 2, space: {model.source: {choices: [a, b]}}}",
            "sweep.search.space.model.source: 'model.source' cannot be searched",
        ),
        (
            "search: {trials: 2, space: {train.lora.rank: {choices: [2]}}}\n  train.iters: [2, 4]",
            "sweep.search: 'sweep.search' cannot be combined with 'sweep.train.iters'",
        ),
        (
            "search: {trials: 2, space: {train.lora.rank: {low: 2, high: x}}}",
            "'train.lora.rank' must be an integer, got a string 'x'",
        ),
    ],
    ids=["unknown_key", "empty_range", "no_trials", "test_metric", "model_key", "with_grid", "wrong_type"],
)
def test_a_wrong_search_is_one_clear_line(project, sweep, expected):
    write_override(project, "sweep:\n  " + sweep + "\n")
    with pytest.raises(ConfigError) as caught:
        load_workspace()
    assert expected in caught.value.line() and "\n" not in caught.value.line()
    result = make(project, "experiments", check=False)
    assert result.returncode == 2 and expected in result.stderr


@pytest.mark.slow
def test_a_failing_trial_is_told_as_failed_and_counts_against_the_budget(project, tiny_model_dir):
    """Both trials pick the one choice (a batch larger than the training split): the second is named
    apart from the first, both are FAIL in the study, and make all ends naming them."""
    space = "sweep:\n  search: {trials: 2, space: {train.batch_size: {choices: [5000]}}}\n"
    write_override(project, f"model:\n  source: {tiny_model_dir}\n{BRIEF}{space}")
    result = make(project, "all", check=False)
    assert result.returncode != 0
    assert [t.state.name for t in study_trials(project)] == ["FAIL", "FAIL"]
    assert load_workspace().names() == ["bs5000", "bs5000-t1"]
    assert re.search(
        r"2 of 2 experiments did not complete: bs5000 \(train: .*batch.*; bs5000-t1 \(train:", result.stderr
    )
    with open(project / "runs" / "experiments.csv", newline="") as f:
        assert [(r["experiment"], r["status"]) for r in csv.DictReader(f)] == [
            ("bs5000", "failed"),
            ("bs5000-t1", "failed"),
        ]
